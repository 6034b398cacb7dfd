//! The schedule of copies, and re-planning from the current state.
//!
//! The state of a deployment ([`Progress`]) is what the executor reports:
//! the copies complete or being made on each datastore, the network
//! transfers in flight, partial files left by failed transfers, the hosts
//! that died, and the time. [`plan`] turns matrix + request + state into a
//! [`Plan`]: the steps from now on, each with its estimated start and
//! finish. Planning from the start and re-planning after an event are the
//! same call; only the state differs.
//!
//! How hosts are reached: a list schedule that is Dijkstra when links are
//! independent. Every host holding a complete copy is a source from the
//! moment it holds it (never before: a host relays only a complete copy).
//! Repeatedly, of every (source, host still without a copy) pair, the copy
//! that would *finish* first is committed; its target becomes a source at
//! that time. With independent links (the seed's model) this gives every
//! host its shortest-path arrival time; with [`HostSpec::egress_slots`] a
//! busy host's sends wait for a free slot. Ties go to a transfer already
//! in flight (its bytes are not wasted), then to fewer hops, then to the
//! lowest host index — which is why FIG 5 sends H1→H3 directly rather than
//! through H2 (both 25).
//!
//! [`HostSpec::egress_slots`]: crate::HostSpec::egress_slots
//!
//! On each host the first copy (over the network) lands on the datastore
//! with the most copies placed; each further datastore gets one
//! cross-datastore copy from it, and every further copy on a datastore is
//! made from the copy on that datastore (step 235, FIG 4): one image over
//! the network per host, one per extra datastore.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{non_negative, PlanError};
use crate::matrix::{fmt_time, Matrix, RouteTable};
use crate::place::{Placement, Request};

/// Copies on one host's datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopiesOn {
    /// The host the copies are for.
    pub host: String,
    /// The datastore they are on.
    pub datastore: String,
    /// Finished copies (renamed from `.partial`), the network one included.
    pub complete: u32,
    /// Local or cross-datastore copies being made; they need no network,
    /// so events elsewhere do not touch them.
    pub in_progress: u32,
}

/// A network copy in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    /// The sending host, which holds a complete copy.
    pub from: String,
    /// The receiving host.
    pub to: String,
    /// Where it is written on `to`.
    pub datastore: String,
    /// When the first byte left.
    pub started_at: f64,
    /// 0 to 1, from the executor's byte count at `reported_at`.
    pub done_fraction: f64,
    /// When `done_fraction` was reported; `None` before the first report
    /// (then it counts from `started_at`). The rest is expected to take
    /// `(1 - done_fraction) × the link's current time` from then on, not
    /// from now: a transfer whose progress is reported late has still been
    /// moving bytes meanwhile, and counting from now would push its finish
    /// back by the reporting delay (and make a slower route look better).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<f64>,
}

impl Transfer {
    /// The expected finish over a link of `link_time` as seen at `now`;
    /// a transfer already overdue is expected at once, not in the past.
    pub fn expected_finish(&self, link_time: f64, now: f64) -> f64 {
        let from = self.reported_at.unwrap_or(self.started_at);
        (from + (1.0 - self.done_fraction) * link_time).max(now)
    }
}

/// A partial file a failed transfer left behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partial {
    /// The host whose disk holds it.
    pub host: String,
    /// The datastore it is on.
    pub datastore: String,
}

/// The state of a deployment, as the executor reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The time of the last event: plans start here.
    pub now: f64,
    /// Hosts that died; they are neither sources nor targets any more.
    #[serde(default)]
    pub failed_hosts: Vec<String>,
    /// Copies finished or being made locally, per host and datastore.
    #[serde(default)]
    pub copies: Vec<CopiesOn>,
    /// Network copies in flight.
    #[serde(default)]
    pub transfers: Vec<Transfer>,
    /// Partial files not yet reported deleted.
    #[serde(default)]
    pub partials: Vec<Partial>,
}

impl Progress {
    /// Nothing done yet, at time `now`.
    pub fn at(now: f64) -> Progress {
        Progress {
            now,
            ..Progress::default()
        }
    }

    fn copies_mut(&mut self, host: &str, datastore: &str) -> &mut CopiesOn {
        let i = match self
            .copies
            .iter()
            .position(|c| c.host == host && c.datastore == datastore)
        {
            Some(i) => i,
            None => {
                self.copies.push(CopiesOn {
                    host: host.to_string(),
                    datastore: datastore.to_string(),
                    complete: 0,
                    in_progress: 0,
                });
                self.copies.len() - 1
            }
        };
        &mut self.copies[i]
    }

    fn copies_on(&self, host: &str, datastore: &str) -> (u32, u32) {
        self.copies
            .iter()
            .filter(|c| c.host == host && c.datastore == datastore)
            .fold((0, 0), |(a, b), c| {
                (
                    a.saturating_add(c.complete),
                    b.saturating_add(c.in_progress),
                )
            })
    }

    fn transfer(&self, from: &str, to: &str) -> Result<usize, PlanError> {
        self.transfers
            .iter()
            .position(|t| t.from == from && t.to == to)
            .ok_or_else(|| PlanError::NoSuchTransfer {
                from: from.to_string(),
                to: to.to_string(),
            })
    }
}

/// What happened, as the executor (or the matrix's monitor) reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum Event {
    /// A link's time was measured anew (the seed's event 610).
    LinkTime { from: String, to: String, time: f64 },
    /// The cable between two hosts failed: both directions go (rows 4 and
    /// 6 of FIG 12B).
    LinkFailed { a: String, b: String },
    /// One direction of a link failed.
    LinkDown { from: String, to: String },
    /// A host died (FIG 9): its transfers stop, and if it was the source,
    /// the hosts holding a complete copy take over (FIG 10).
    HostFailed {
        /// The host that died.
        host: String,
    },
    /// The executor began a network copy the plan asked for.
    TransferStarted {
        from: String,
        to: String,
        datastore: String,
    },
    /// The share of a transfer's bytes written so far, at the event's
    /// time.
    TransferProgress {
        from: String,
        to: String,
        /// 0 to 1.
        done_fraction: f64,
    },
    /// A network copy was verified and renamed: the target is a source now.
    TransferCompleted {
        from: String,
        to: String,
        /// How long the whole image took, when the executor measured it
        /// cleanly: it becomes the link's deployment time (step 250 reuses
        /// what earlier stages measured), so a link that proved slower or
        /// faster than probed is planned with what it really did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        observed: Option<f64>,
    },
    /// A network copy broke off; its partial file is to be deleted.
    TransferFailed { from: String, to: String },
    /// The executor deleted a partial file the plan asked it to.
    PartialDeleted { host: String, datastore: String },
    /// A local or cross-datastore copy onto `datastore` began.
    LocalCopyStarted { host: String, datastore: String },
    /// A local or cross-datastore copy onto `datastore` is complete.
    LocalCopyCompleted { host: String, datastore: String },
    /// Nothing happened, but time passed: re-plan as of now (a send queued
    /// behind a host's egress limit falls due on the clock).
    Tick,
}

/// Records `event`, which happened at time `at`, in the matrix and the
/// state. Re-plan with [`plan`] afterwards.
pub fn apply_event(
    matrix: &mut Matrix,
    progress: &mut Progress,
    at: f64,
    event: &Event,
) -> Result<(), PlanError> {
    non_negative("the event time", at)?;
    if at < progress.now {
        return Err(PlanError::TimeBackwards {
            now: progress.now,
            asked: at,
        });
    }
    match event {
        Event::LinkTime { from, to, time } => matrix.set_time(from, to, *time)?,
        Event::LinkFailed { a, b } => {
            // One of the two may be into the source, which has no row.
            let (ia, ib) = (matrix.index(a)?, matrix.index(b)?);
            if ia == ib {
                return Err(PlanError::SelfLink(a.clone()));
            }
            if ib != 0 {
                matrix.remove_link(a, b)?;
            }
            if ia != 0 {
                matrix.remove_link(b, a)?;
            }
        }
        Event::LinkDown { from, to } => {
            matrix.remove_link(from, to)?;
        }
        Event::HostFailed { host } => {
            matrix.index(host)?;
            if !progress.failed_hosts.contains(host) {
                progress.failed_hosts.push(host.clone());
            }
        }
        Event::TransferStarted {
            from,
            to,
            datastore,
        } => {
            if matrix.time(from, to)?.is_none() {
                return Err(PlanError::NoLink {
                    from: from.clone(),
                    to: to.clone(),
                });
            }
            // Progress and completion name a transfer by its two ends, so
            // two at once over one link would be ambiguous.
            if progress.transfer(from, to).is_ok() {
                return Err(PlanError::DuplicateTransfer {
                    from: from.clone(),
                    to: to.clone(),
                });
            }
            progress.transfers.push(Transfer {
                from: from.clone(),
                to: to.clone(),
                datastore: datastore.clone(),
                started_at: at,
                done_fraction: 0.0,
                reported_at: None,
            });
        }
        Event::TransferProgress {
            from,
            to,
            done_fraction,
        } => {
            let i = progress.transfer(from, to)?;
            if !(0.0..=1.0).contains(done_fraction) {
                return Err(PlanError::BadFraction {
                    from: from.clone(),
                    to: to.clone(),
                    fraction: *done_fraction,
                });
            }
            progress.transfers[i].done_fraction = *done_fraction;
            progress.transfers[i].reported_at = Some(at);
        }
        Event::TransferCompleted { from, to, observed } => {
            let i = progress.transfer(from, to)?;
            if let Some(took) = observed {
                let took = non_negative("the observed transfer time", *took)?;
                // A link that failed meanwhile stays failed: the copy got
                // through, but the link is not to be planned on again.
                if matrix.time(from, to)?.is_some() {
                    matrix.set_time(from, to, took)?;
                }
            }
            let t = progress.transfers.remove(i);
            let c = progress.copies_mut(&t.to, &t.datastore);
            c.complete = c.complete.saturating_add(1);
        }
        Event::TransferFailed { from, to } => {
            let i = progress.transfer(from, to)?;
            let t = progress.transfers.remove(i);
            progress.partials.push(Partial {
                host: t.to,
                datastore: t.datastore,
            });
        }
        Event::PartialDeleted { host, datastore } => {
            progress
                .partials
                .retain(|p| !(p.host == *host && p.datastore == *datastore));
        }
        Event::LocalCopyStarted { host, datastore } => {
            matrix.index(host)?;
            let c = progress.copies_mut(host, datastore);
            c.in_progress = c.in_progress.saturating_add(1);
        }
        Event::LocalCopyCompleted { host, datastore } => {
            matrix.index(host)?;
            let c = progress.copies_mut(host, datastore);
            c.in_progress = c.in_progress.saturating_sub(1);
            c.complete = c.complete.saturating_add(1);
        }
        Event::Tick => {}
    }
    progress.now = at;
    Ok(())
}

/// One thing for the executor to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    /// Copy the image over the direct link `from → to`, reading the
    /// complete copy on `from_datastore` and writing `to_datastore`
    /// (through a partial file renamed once verified).
    NetworkCopy {
        from: String,
        from_datastore: String,
        to: String,
        to_datastore: String,
    },
    /// One more copy within a datastore that already holds one.
    LocalCopy { host: String, datastore: String },
    /// The first copy on another datastore of the same host.
    CrossDatastoreCopy {
        host: String,
        from_datastore: String,
        to_datastore: String,
    },
    /// Stop a network copy in flight (its route broke, or a better one
    /// reaches the host first).
    CancelTransfer { from: String, to: String },
    /// Delete the partial file a stopped or failed copy left.
    DeletePartial { host: String, datastore: String },
    /// Give the whole deployment up (step 960).
    Abort { reason: String },
}

impl Action {
    /// The host whose disk the action writes (or whose transfer it stops).
    pub fn host(&self) -> &str {
        match self {
            Action::NetworkCopy { to, .. } | Action::CancelTransfer { to, .. } => to,
            Action::LocalCopy { host, .. }
            | Action::CrossDatastoreCopy { host, .. }
            | Action::DeletePartial { host, .. } => host,
            Action::Abort { .. } => "",
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Action::Abort { .. } => 0,
            Action::CancelTransfer { .. } => 1,
            Action::DeletePartial { .. } => 2,
            Action::NetworkCopy { .. } => 3,
            Action::CrossDatastoreCopy { .. } => 4,
            Action::LocalCopy { .. } => 5,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::NetworkCopy {
                from,
                from_datastore,
                to,
                to_datastore,
            } => write!(
                f,
                "network copy {from}:{from_datastore} -> {to}:{to_datastore}"
            ),
            Action::LocalCopy { host, datastore } => write!(f, "local copy on {host}:{datastore}"),
            Action::CrossDatastoreCopy {
                host,
                from_datastore,
                to_datastore,
            } => write!(
                f,
                "cross-datastore copy on {host}: {from_datastore} -> {to_datastore}"
            ),
            Action::CancelTransfer { from, to } => write!(f, "cancel transfer {from} -> {to}"),
            Action::DeletePartial { host, datastore } => {
                write!(f, "delete partial on {host}:{datastore}")
            }
            Action::Abort { reason } => write!(f, "abort: {reason}"),
        }
    }
}

/// An action and when it is expected to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// What to do.
    pub action: Action,
    /// When it is expected to start (for a running step: when it did).
    pub start: f64,
    /// When it is expected to end.
    pub finish: f64,
    /// Already under way (a transfer in flight that the plan keeps).
    #[serde(default)]
    pub running: bool,
    /// The complete copy this step copies from, while it does not exist
    /// yet. `start` is only an estimate of when it will: the executor
    /// starts the step once the copy is reported complete, never on the
    /// clock alone, so that no host sends (and no datastore is copied)
    /// before it holds a whole image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waits_for: Option<CopyAt>,
}

/// A copy of the image on one datastore of one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyAt {
    /// The host holding it.
    pub host: String,
    /// The datastore it is on.
    pub datastore: String,
}

/// How a host comes to hold a complete copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "via")]
pub enum Via {
    /// It holds one already (the source's image, or a finished copy).
    Held,
    /// Over the network.
    Network {
        /// The sending host.
        from: String,
    },
    /// A datastore it mounts receives one for another host.
    Shared {
        /// The shared datastore.
        datastore: String,
    },
}

/// When a host holds a complete copy and can act as a source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReady {
    /// The host.
    pub host: String,
    /// When it holds its copy (`now` for one it holds already).
    pub at: f64,
    /// How the copy gets there.
    pub via: Via,
}

/// The schedule from `now` on, and the matrix it was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The time it was made for: the progress's last event.
    pub now: f64,
    /// The matrix's Preferred and Precondition columns and the paths, over
    /// the live hosts.
    pub routes: RouteTable,
    /// Ordered by start time; cancels and deletions come first.
    pub steps: Vec<Step>,
    /// The live hosts that hold or will hold a complete copy.
    pub ready: Vec<HostReady>,
    /// Live target hosts no route reaches: reported, so that the caller
    /// can finish the others and tell the operator which ones missed out.
    pub unreachable: Vec<String>,
    /// Target hosts that failed; they get nothing more.
    #[serde(default)]
    pub failed: Vec<String>,
    /// Why the deployment ends here, when it does.
    pub abort: Option<String>,
    /// When the last step ends.
    pub makespan: f64,
}

impl Plan {
    /// The network copies, with their senders and receivers.
    pub fn network_copies(&self) -> impl Iterator<Item = (&str, &str, &Step)> {
        self.steps.iter().filter_map(|s| match &s.action {
            Action::NetworkCopy { from, to, .. } => Some((from.as_str(), to.as_str(), s)),
            _ => None,
        })
    }

    /// When `host` holds (or will hold) a complete copy.
    pub fn ready_at(&self, host: &str) -> Option<f64> {
        self.ready.iter().find(|r| r.host == host).map(|r| r.at)
    }

    /// The steps to start now: not under way, not waiting for a copy to
    /// complete, and not queued behind other sends of the same host.
    pub fn due(&self) -> impl Iterator<Item = &Step> {
        self.steps
            .iter()
            .filter(|s| !s.running && s.waits_for.is_none() && s.start <= self.now)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.routes.fmt(f)?;
        writeln!(f)?;
        writeln!(f, "plan at {}", fmt_time(self.now))?;
        writeln!(f, "{:>10} {:>10}  action", "start", "finish")?;
        for s in &self.steps {
            let note = match (&s.waits_for, s.running) {
                (_, true) => "  (running)".to_string(),
                (Some(w), false) => format!("  (once {}:{} is complete)", w.host, w.datastore),
                (None, false) => String::new(),
            };
            writeln!(
                f,
                "{:>10} {:>10}  {}{note}",
                fmt_time(s.start),
                fmt_time(s.finish),
                s.action
            )?;
        }
        for h in &self.unreachable {
            writeln!(f, "unreachable: {h}")?;
        }
        for h in &self.failed {
            writeln!(f, "failed: {h}")?;
        }
        if let Some(r) = &self.abort {
            writeln!(f, "aborted: {r}")?;
        }
        write!(f, "makespan {}", fmt_time(self.makespan))
    }
}

/// A candidate network copy in the list schedule.
#[derive(Clone, Copy)]
struct Candidate {
    finish: f64,
    /// Added to `finish` when candidates are compared: a transfer in
    /// flight looks [`KEEP_IN_FLIGHT`] of its link's time earlier, so that
    /// another route must beat it by that much before it is cancelled.
    /// Estimates are only estimates: without it, a route a hair earlier on
    /// paper throws away the bytes already sent (a real tie, G3's H1→H3 and
    /// H2→H3, flips with each millisecond of reporting delay).
    bias: f64,
    start: f64,
    /// Index into the state's transfers when already in flight.
    in_flight: Option<usize>,
    hops: u32,
    from: usize,
    to: usize,
}

impl Candidate {
    fn better_than(&self, o: &Candidate) -> bool {
        (self.finish + self.bias)
            .total_cmp(&(o.finish + o.bias))
            .then(o.in_flight.is_some().cmp(&self.in_flight.is_some()))
            .then(self.hops.cmp(&o.hops))
            .then(self.from.cmp(&o.from))
            .then(self.to.cmp(&o.to))
            .is_lt()
    }
}

/// How much earlier (a share of its link's time) another route must
/// finish before a transfer in flight is cancelled for it.
pub const KEEP_IN_FLIGHT: f64 = 0.1;

/// The earliest time ≥ `ready` at which a send of length `length` fits
/// among `busy` sends with at most `slots` at once.
fn earliest_start(busy: &[(f64, f64)], slots: Option<u32>, ready: f64, length: f64) -> f64 {
    let Some(slots) = slots else { return ready };
    let slots = slots as usize;
    let mut starts: Vec<f64> = std::iter::once(ready)
        .chain(busy.iter().map(|b| b.1).filter(|f| *f > ready))
        .collect();
    starts.sort_by(f64::total_cmp);
    let overlapping = |p: f64| busy.iter().filter(|b| b.0 <= p && p < b.1).count();
    for s in &starts {
        let end = s + length;
        let fits = std::iter::once(*s)
            .chain(busy.iter().map(|b| b.0).filter(|b| *b > *s && *b < end))
            .all(|p| overlapping(p) < slots);
        if fits {
            return *s;
        }
    }
    // After every busy send has ended there is always room.
    starts.last().copied().unwrap_or(ready)
}

fn validate_progress(matrix: &Matrix, progress: &Progress) -> Result<(), PlanError> {
    let now = non_negative("now", progress.now)?;
    for h in &progress.failed_hosts {
        matrix.index(h)?;
    }
    for c in &progress.copies {
        matrix.index(&c.host)?;
    }
    for p in &progress.partials {
        matrix.index(&p.host)?;
    }
    for t in &progress.transfers {
        matrix.index(&t.from)?;
        matrix.index(&t.to)?;
        let started = non_negative("a transfer's start", t.started_at)?;
        if let Some(at) = t.reported_at {
            let at = non_negative("a transfer's progress report time", at)?;
            if at < started || at > now {
                return Err(PlanError::BadNumber {
                    what: format!(
                        "the progress report time of transfer {} -> {} (between its start {started} and now {now})",
                        t.from, t.to
                    ),
                    value: at,
                });
            }
        }
        if started > now {
            return Err(PlanError::StartedInFuture {
                from: t.from.clone(),
                to: t.to.clone(),
                started_at: started,
                now,
            });
        }
        if !(0.0..=1.0).contains(&t.done_fraction) {
            return Err(PlanError::BadFraction {
                from: t.from.clone(),
                to: t.to.clone(),
                fraction: t.done_fraction,
            });
        }
    }
    Ok(())
}

/// Plans (or re-plans) the deployment from `progress` on.
///
/// Errors are for input that makes no sense (an unknown host or
/// datastore, a negative time). A state that cannot go on is not an error
/// but a plan: hosts no route reaches are listed in
/// [`Plan::unreachable`] (the others are still served), and when no live
/// host holds a complete copy the plan is an abort that deletes every
/// partial file (FIG 9, step 960).
pub fn plan(
    matrix: &Matrix,
    request: &Request,
    placement: &Placement,
    progress: &Progress,
) -> Result<Plan, PlanError> {
    request.validate(matrix)?;
    validate_progress(matrix, progress)?;
    placement.validate(matrix, request)?;
    let now = progress.now;
    let n = matrix.len();
    let dss = &request.datastores;
    let mut alive = vec![true; n];
    for h in &progress.failed_hosts {
        alive[matrix.index(h)?] = false;
    }
    let ds_index = |id: &str| -> Result<usize, PlanError> {
        dss.iter()
            .position(|d| d.id == id)
            .ok_or_else(|| PlanError::UnknownDatastore(id.to_string()))
    };
    let host_ix = |name: &str| matrix.index(name);
    for c in &progress.copies {
        ds_index(&c.datastore)?;
    }
    for t in &progress.transfers {
        ds_index(&t.datastore)?;
    }
    for p in &progress.partials {
        ds_index(&p.datastore)?;
    }

    // Which datastores hold a complete image now, readable by a live host.
    let readable: Vec<bool> = dss
        .iter()
        .map(|d| d.hosts.iter().any(|h| host_ix(h).is_ok_and(|i| alive[i])))
        .collect();
    let mut ds_ready: Vec<Option<f64>> = dss
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let image = d.id == request.source_datastore
                || progress
                    .copies
                    .iter()
                    .any(|c| c.datastore == d.id && c.complete > 0);
            (image && readable[i]).then_some(now)
        })
        .collect();
    let complete_now: Vec<bool> = ds_ready.iter().map(Option::is_some).collect();
    let attached_to = |h: usize| -> Vec<usize> {
        (0..dss.len())
            .filter(|&d| dss[d].attached(matrix.name(h)))
            .collect()
    };

    // The hosts holding a copy now, and the datastore each reads it from
    // (its own finished copy first, then any other it mounts).
    let mut ready: Vec<Option<(f64, u32, Via)>> = vec![None; n];
    let mut base: Vec<Option<usize>> = vec![None; n];
    for h in (0..n).filter(|h| alive[*h]) {
        let mine = attached_to(h);
        let own = mine.iter().copied().find(|&d| {
            ds_ready[d].is_some() && progress.copies_on(matrix.name(h), &dss[d].id).0 > 0
        });
        let any = mine.iter().copied().find(|&d| ds_ready[d].is_some());
        if let Some(d) = own.or(any) {
            ready[h] = Some((now, 0, Via::Held));
            base[h] = Some(d);
        }
    }

    let held_now: Vec<bool> = ready.iter().map(Option::is_some).collect();

    // A host with no copies placed needs none: it is not a target.
    let placed: Vec<Option<&crate::place::HostPlacement>> = (0..n)
        .map(|h| placement.host(matrix.name(h)).filter(|hp| hp.copies() > 0))
        .collect();
    let failed: Vec<String> = (0..n)
        .filter(|&h| !alive[h] && placed[h].is_some())
        .map(|h| matrix.name(h).to_string())
        .collect();
    let mut pending: Vec<bool> = (0..n)
        .map(|h| alive[h] && placed[h].is_some() && ready[h].is_none())
        .collect();

    let mut steps: Vec<Step> = Vec::new();
    let cancel = |steps: &mut Vec<Step>, t: &Transfer, alive: &[bool]| -> Result<(), PlanError> {
        let (f, to) = (host_ix(&t.from)?, host_ix(&t.to)?);
        if alive[f] || alive[to] {
            steps.push(Step {
                action: Action::CancelTransfer {
                    from: t.from.clone(),
                    to: t.to.clone(),
                },
                start: now,
                finish: now,
                running: false,
                waits_for: None,
            });
        }
        if alive[to] {
            steps.push(Step {
                action: Action::DeletePartial {
                    host: t.to.clone(),
                    datastore: t.datastore.clone(),
                },
                start: now,
                finish: now,
                running: false,
                waits_for: None,
            });
        }
        Ok(())
    };
    for p in &progress.partials {
        if alive[host_ix(&p.host)?] {
            steps.push(Step {
                action: Action::DeletePartial {
                    host: p.host.clone(),
                    datastore: p.datastore.clone(),
                },
                start: now,
                finish: now,
                running: false,
                waits_for: None,
            });
        }
    }

    let roots: Vec<usize> = if alive[0] {
        vec![0]
    } else {
        (0..n).filter(|h| ready[*h].is_some()).collect()
    };
    let routes = matrix.route_table(&roots, &alive);

    // Nothing to copy from: the end (FIG 9, 925 → 960).
    if ready.iter().all(Option::is_none) {
        for t in &progress.transfers {
            cancel(&mut steps, t, &alive)?;
        }
        let reason = "no live host holds a complete copy of the image".to_string();
        steps.insert(
            0,
            Step {
                action: Action::Abort {
                    reason: reason.clone(),
                },
                start: now,
                finish: now,
                running: false,
                waits_for: None,
            },
        );
        let unreachable = (0..n)
            .filter(|h| pending[*h])
            .map(|h| matrix.name(h).to_string())
            .collect();
        return Ok(Plan {
            now,
            routes,
            steps,
            ready: Vec::new(),
            unreachable,
            failed,
            abort: Some(reason),
            makespan: now,
        });
    }

    // Transfers in flight: those whose route still stands compete with new
    // copies; the rest are stopped and their partial files deleted.
    let mut live_transfers: Vec<Option<f64>> = vec![None; progress.transfers.len()];
    let mut busy: Vec<Vec<(f64, f64, Option<usize>)>> = vec![Vec::new(); n];
    for (i, t) in progress.transfers.iter().enumerate() {
        let (f, to, d) = (host_ix(&t.from)?, host_ix(&t.to)?, ds_index(&t.datastore)?);
        let link = matrix.time_at(f, to);
        let ok =
            alive[f] && alive[to] && ready[f].is_some() && pending[to] && dss[d].attached(&t.to);
        match (ok, link) {
            (true, Some(time)) => {
                let finish = t.expected_finish(time, now);
                live_transfers[i] = Some(finish);
                busy[f].push((t.started_at, finish, Some(i)));
            }
            _ => cancel(&mut steps, t, &alive)?,
        }
    }

    let mut landing: Vec<Option<usize>> = vec![None; n];
    loop {
        let mut best: Option<Candidate> = None;
        let mut offer = |c: Candidate| {
            if best.as_ref().is_none_or(|b| c.better_than(b)) {
                best = Some(c);
            }
        };
        for (i, t) in progress.transfers.iter().enumerate() {
            if let Some(finish) = live_transfers[i] {
                let (f, to) = (host_ix(&t.from)?, host_ix(&t.to)?);
                if pending[to] {
                    let link = matrix.time_at(f, to).unwrap_or(0.0);
                    offer(Candidate {
                        finish,
                        bias: -KEEP_IN_FLIGHT * link,
                        start: t.started_at,
                        in_flight: Some(i),
                        hops: ready[f].as_ref().map_or(0, |r| r.1) + 1,
                        from: f,
                        to,
                    });
                }
            }
        }
        for v in (0..n).filter(|v| pending[*v]) {
            for u in 0..n {
                let (Some((at, hops, _)), Some(time)) = (&ready[u], matrix.time_at(u, v)) else {
                    continue;
                };
                let intervals: Vec<(f64, f64)> = busy[u].iter().map(|b| (b.0, b.1)).collect();
                let start = earliest_start(&intervals, matrix.slots_at(u), at.max(now), time);
                offer(Candidate {
                    finish: start + time,
                    bias: 0.0,
                    start,
                    in_flight: None,
                    hops: hops + 1,
                    from: u,
                    to: v,
                });
            }
        }
        let Some(c) = best else { break };
        let (from, to) = (c.from, c.to);
        let to_ds = match c.in_flight {
            Some(i) => ds_index(&progress.transfers[i].datastore)?,
            None => {
                let hp =
                    placed[to].ok_or_else(|| PlanError::UnknownHost(matrix.name(to).into()))?;
                // The datastore with the most copies placed (the first on a
                // tie), so that the fewest copies cross datastores.
                let landing_ds = hp
                    .datastores
                    .iter()
                    .reduce(|a, b| if b.copies > a.copies { b } else { a })
                    .ok_or_else(|| PlanError::NoDatastore(hp.host.clone()))?;
                let best_ds = ds_index(&landing_ds.datastore)?;
                busy[from].push((c.start, c.finish, None));
                best_ds
            }
        };
        let from_ds = base[from].unwrap_or(to_ds);
        steps.push(Step {
            action: Action::NetworkCopy {
                from: matrix.name(from).to_string(),
                from_datastore: dss[from_ds].id.clone(),
                to: matrix.name(to).to_string(),
                to_datastore: dss[to_ds].id.clone(),
            },
            start: c.start,
            finish: c.finish,
            running: c.in_flight.is_some(),
            waits_for: (!held_now[from]).then(|| CopyAt {
                host: matrix.name(from).to_string(),
                datastore: dss[from_ds].id.clone(),
            }),
        });
        ready[to] = Some((
            c.finish,
            c.hops,
            Via::Network {
                from: matrix.name(from).to_string(),
            },
        ));
        base[to] = Some(to_ds);
        landing[to] = Some(to_ds);
        pending[to] = false;
        if ds_ready[to_ds].is_none() {
            ds_ready[to_ds] = Some(c.finish);
        }
        // Hosts mounting the same datastore read this copy: no network.
        let mut reached = vec![to];
        for w in 0..n {
            if alive[w] && ready[w].is_none() && dss[to_ds].attached(matrix.name(w)) {
                ready[w] = Some((
                    c.finish,
                    c.hops,
                    Via::Shared {
                        datastore: dss[to_ds].id.clone(),
                    },
                ));
                base[w] = Some(to_ds);
                pending[w] = false;
                reached.push(w);
            }
        }
        // Other transfers to the hosts just reached are not needed.
        for (i, t) in progress.transfers.iter().enumerate() {
            if Some(i) == c.in_flight || live_transfers[i].is_none() {
                continue;
            }
            if reached.contains(&host_ix(&t.to)?) {
                live_transfers[i] = None;
                let f = host_ix(&t.from)?;
                busy[f].retain(|b| b.2 != Some(i));
                cancel(&mut steps, t, &alive)?;
            }
        }
    }

    // Local and cross-datastore copies on every host that holds (or will
    // hold) its first copy.
    for h in 0..n {
        let (Some(hp), Some((at, _, _)), Some(b)) = (placed[h], &ready[h], base[h]) else {
            continue;
        };
        if !alive[h] {
            continue;
        }
        let host = matrix.name(h);
        for dc in &hp.datastores {
            let d = ds_index(&dc.datastore)?;
            let (complete, in_progress) = progress.copies_on(host, &dc.datastore);
            let arriving = u32::from(landing[h] == Some(d));
            let mut remaining = dc.copies.saturating_sub(
                complete
                    .saturating_add(in_progress)
                    .saturating_add(arriving),
            );
            if remaining == 0 {
                continue;
            }
            let avail = match ds_ready[d] {
                Some(t) => t.max(now),
                // A copy onto it is under way already: assume it just began.
                None if in_progress > 0 => now + request.cross_datastore_time,
                None => {
                    let start = at.max(now);
                    let finish = start + request.cross_datastore_time;
                    steps.push(Step {
                        action: Action::CrossDatastoreCopy {
                            host: host.to_string(),
                            from_datastore: dss[b].id.clone(),
                            to_datastore: dc.datastore.clone(),
                        },
                        start,
                        finish,
                        running: false,
                        waits_for: (!complete_now[b]).then(|| CopyAt {
                            host: host.to_string(),
                            datastore: dss[b].id.clone(),
                        }),
                    });
                    remaining -= 1;
                    ds_ready[d] = Some(finish);
                    finish
                }
            };
            for _ in 0..remaining {
                steps.push(Step {
                    action: Action::LocalCopy {
                        host: host.to_string(),
                        datastore: dc.datastore.clone(),
                    },
                    start: avail,
                    finish: avail + request.local_copy_time,
                    running: false,
                    waits_for: (!complete_now[d]).then(|| CopyAt {
                        host: host.to_string(),
                        datastore: dc.datastore.clone(),
                    }),
                });
            }
        }
    }

    steps.sort_by(|a, b| {
        a.start
            .total_cmp(&b.start)
            .then(a.action.rank().cmp(&b.action.rank()))
            .then(a.finish.total_cmp(&b.finish))
    });
    let makespan = steps.iter().map(|s| s.finish).fold(now, f64::max);
    let ready_list = (0..n)
        .filter_map(|h| {
            let (at, _, via) = ready[h].clone()?;
            alive[h].then(|| HostReady {
                host: matrix.name(h).to_string(),
                at,
                via,
            })
        })
        .collect();
    let unreachable = (0..n)
        .filter(|h| pending[*h])
        .map(|h| matrix.name(h).to_string())
        .collect();
    Ok(Plan {
        now,
        routes,
        steps,
        ready: ready_list,
        unreachable,
        failed,
        abort: None,
        makespan,
    })
}
