//! Fan-out deployment's plan (seed 002): what to copy where and when,
//! kept apart from sockets, files and clocks so that it is tested without
//! them. The manager owns the I/O: it measures links, runs the steps and
//! reports what happened; this crate owns every decision.
//!
//! - [`matrix`]: the deployment-time matrix, one row per directed direct
//!   link, with the seed's Preferred and Precondition columns, the
//!   preferred paths from the source and between every pair of hosts, and
//!   `time = image / rate`;
//! - [`place`](mod@place): the request (image, datastores, copies per host or
//!   spread by free room) and where the copies go, with room checked up
//!   front so that a full datastore is an error before a byte moves;
//! - [`schedule`]: the steps (network, local and cross-datastore copies,
//!   cancels, partial-file deletions, abort) with start and finish
//!   estimates, and re-planning from the state the executor reports after
//!   an event (a link's time changes, a link or host fails, a copy
//!   completes).
//!
//! [`Deployment`] holds the four together for the manager, which stores it
//! (everything here is serde) and shows the plan (`Display`). The loop is:
//! start every step of [`Plan::due`], report each start, progress,
//! completion and failure with [`Deployment::apply`], and start what the
//! new plan makes due. A step that copies from a copy still being made
//! says so ([`Step::waits_for`]) and is never due before that copy is
//! reported complete: a host becomes a source only once it holds a whole
//! image, whatever the estimates say.
//!
//! Times are plain numbers in whatever unit the matrix uses (the seed's
//! minutes, or seconds); the caller passes the current time in with each
//! event. The golden tests keep the seed's model of independent links;
//! [`HostSpec::egress_slots`] is for real hosts whose copies share one NIC.
//! Nothing here panics on any input: what makes no sense (an unknown
//! host, a NaN, negative or infinite time, a zero count) is a
//! [`PlanError`].

pub mod error;
pub mod matrix;
pub mod place;
pub mod schedule;

use serde::{Deserialize, Serialize};

pub use error::PlanError;
pub use matrix::{transfer_time, HostSpec, LinkTime, Matrix, Route, RouteRow, RouteTable};
pub use place::{
    place, Datastore, DatastoreCopies, HostPlacement, PerHost, Placement, Request, MAX_COPIES,
};
pub use schedule::{
    apply_event, plan, Action, CopiesOn, CopyAt, Event, HostReady, Partial, Plan, Progress, Step,
    Transfer, Via,
};

/// One deployment: the matrix, the request, where the copies go and how
/// far it has come.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// The deployment times as measured and changed by events.
    pub matrix: Matrix,
    /// What the operator asked for; it never changes.
    pub request: Request,
    /// Where the copies go, fixed when the deployment is created so that
    /// re-planning never moves a copy the operator was shown.
    pub placement: Placement,
    /// What the executor has reported so far.
    pub progress: Progress,
}

impl Deployment {
    /// Checks everything that can be checked before a byte moves (room on
    /// every datastore, a route to every host) and places the copies.
    pub fn new(matrix: Matrix, request: Request, now: f64) -> Result<Deployment, PlanError> {
        let placement = place(&matrix, &request)?;
        let deployment = Deployment {
            matrix,
            request,
            placement,
            progress: Progress::at(now),
        };
        let first = deployment.plan()?;
        if let Some(host) = first.unreachable.first() {
            return Err(PlanError::NoRoute(host.clone()));
        }
        Ok(deployment)
    }

    /// The plan from the current state on.
    pub fn plan(&self) -> Result<Plan, PlanError> {
        plan(&self.matrix, &self.request, &self.placement, &self.progress)
    }

    /// Records an event at time `at` and re-plans. On an error nothing is
    /// changed.
    pub fn apply(&mut self, at: f64, event: &Event) -> Result<Plan, PlanError> {
        let mut matrix = self.matrix.clone();
        let mut progress = self.progress.clone();
        apply_event(&mut matrix, &mut progress, at, event)?;
        let next = plan(&matrix, &self.request, &self.placement, &progress)?;
        self.matrix = matrix;
        self.progress = progress;
        Ok(next)
    }
}
