//! Self-fencing: the primary's side of "never two running copies".
//!
//! The primary pauses its guest when the backup has not *heard it* for the
//! fencing timeout, but only while the backup may hold something it could
//! resume. "Heard" is measured by the backup's echo of the primary's
//! heartbeat stamps: contact is the send time of the newest stamp the
//! backup has echoed. The backup takes over when it has heard nothing for
//! a longer timeout, counted from when it last read a frame, which is no
//! earlier than that send time; so in every partition (either direction,
//! or both) the guest here is stopped first. A shim lease backs this up for
//! a dead or stuck tandemd.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

use tandem_api::{FtState, FtStatus};
use tracing::warn;

use super::guest::Guest;
use crate::clock::{lease_deadline, Clock, Instant};

/// The fence, as one state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fence {
    /// The backup holds nothing it could resume: losing it cannot cause a
    /// split brain, and pausing the guest would only take it down. An
    /// initial copy that stalls, or a backup that never answers, leaves
    /// protection degraded and the guest running.
    Disarmed,
    /// The backup may hold a consistent replica, so it may take over:
    /// silence fences. Set before the first epoch with device state is sent
    /// (the backup can only arm itself with an epoch the primary sent), or
    /// when a session finds epochs committed by an earlier one.
    Armed,
    /// The guest is stopped for lack of word from the backup. `paused`:
    /// the fence paused a running guest, so a granted resume continues it.
    Fenced { paused: bool },
    /// QMP stop failed; the shim's lease freezes QEMU instead. Cannot be
    /// lifted from here.
    Frozen,
}

impl Fence {
    pub(crate) fn is_fenced(self) -> bool {
        matches!(self, Fence::Fenced { .. } | Fence::Frozen)
    }
}

/// Liveness of the backup as the primary sees it, shared between the
/// reader, the fencing watchdog and the epoch loop.
pub(crate) struct Contact {
    clock: Arc<dyn Clock>,
    /// The newest moment the backup is known to have heard us, monotonic.
    last_heard: Mutex<Instant>,
    fence: Mutex<Fence>,
}

impl Contact {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        let now = clock.now();
        Contact {
            clock,
            last_heard: Mutex::new(now),
            fence: Mutex::new(Fence::Disarmed),
        }
    }

    /// Contact now (the fault hook's one-way liveness, and the start of
    /// the process).
    pub(crate) fn touch(&self) {
        *self.last_heard.lock() = self.clock.now();
    }

    /// The backup is known to have heard us as of `at` (when the stamp it
    /// echoed was sent). Contact never moves back.
    pub(crate) fn heard_as_of(&self, at: Instant) {
        let mut last = self.last_heard.lock();
        if at > *last {
            *last = at;
        }
    }

    pub(crate) fn silent_for(&self) -> Duration {
        self.clock
            .now()
            .saturating_duration_since(*self.last_heard.lock())
    }

    pub(crate) fn fence(&self) -> Fence {
        *self.fence.lock()
    }

    pub(crate) fn is_fenced(&self) -> bool {
        self.fence().is_fenced()
    }

    /// The backup may now resume the guest. Returns whether this armed a
    /// disarmed fence (a fenced guest stays fenced).
    pub(crate) fn arm(&self) -> bool {
        let mut f = self.fence.lock();
        let armed = *f == Fence::Disarmed;
        if armed {
            *f = Fence::Armed;
        }
        armed
    }

    /// The backup holds nothing resumable any more. Returns whether this
    /// disarmed an armed fence.
    pub(crate) fn disarm(&self) -> bool {
        let mut f = self.fence.lock();
        let disarmed = *f == Fence::Armed;
        if disarmed {
            *f = Fence::Disarmed;
        }
        disarmed
    }

    /// Arms → fenced (the guest is about to be paused). Returns whether
    /// the caller must now pause it.
    pub(crate) fn begin_fence(&self) -> bool {
        let mut f = self.fence.lock();
        let begin = *f == Fence::Armed;
        if begin {
            *f = Fence::Fenced { paused: false };
        }
        begin
    }

    pub(crate) fn fenced(&self, outcome: Fence) {
        *self.fence.lock() = outcome;
    }

    /// The backup answered before taking over: the guest may run again
    /// (and the backup, which still holds its replica, stays armed).
    pub(crate) fn lift(&self) {
        let mut f = self.fence.lock();
        if matches!(*f, Fence::Fenced { .. }) {
            *f = Fence::Armed;
        }
    }

    /// The shim's lease deadline (lease clock, ms) for the current silence.
    pub(crate) fn lease_deadline(&self, fence_timeout: Duration) -> u64 {
        let remaining = (fence_timeout + LEASE_GRACE).saturating_sub(self.silent_for());
        lease_deadline(self.clock.as_ref(), remaining)
    }
}

/// Extra time the shim's lease allows beyond the engine's own fencing, so
/// the clean path (QMP stop) normally wins and the shim's SIGSTOP is only
/// the backstop for a dead or stuck tandemd.
pub const LEASE_GRACE: Duration = Duration::from_millis(200);

/// How often the shim reads its lease (`tandem_supervisor::shim`).
const SHIM_POLL: Duration = Duration::from_millis(20);

/// The shortest takeover timeout that is safe with these primary
/// settings. When tandemd itself dies, only the shim's lease stops the
/// guest: at the fencing timeout plus [`LEASE_GRACE`], seen within one
/// shim poll; two heartbeats more cover the stamp the backup last echoed
/// being older than the last frame it read. (The simulation found a
/// takeover at fence + 2 heartbeats racing a dead tandemd's lease.)
pub fn min_takeover_timeout(fence_timeout: Duration, heartbeat: Duration) -> Duration {
    fence_timeout + LEASE_GRACE + SHIM_POLL + heartbeat * 2
}

/// How often the watchdog looks. The lease is rewritten only when contact
/// moved it by more than this, so a healthy link costs a few small writes
/// per second, not one per ack.
const TICK: Duration = Duration::from_millis(20);

/// Renews the shim's fence lease while the backup answers, and fences the
/// guest (QMP stop) the moment it has been silent for the fencing timeout.
/// Runs beside the epoch loop so a blocked send cannot delay fencing.
pub(crate) async fn fence_watchdog<G: Guest>(
    guest: G,
    contact: Arc<Contact>,
    timeout: Duration,
    status: Arc<Mutex<FtStatus>>,
) {
    // It runs until the engine ends, also while protection is ending: the
    // guest may run on unfenced only once the backup has confirmed `Bye`.
    let mut tick = tokio::time::interval(TICK);
    let mut lease_written: Option<u64> = None;
    loop {
        tick.tick().await;
        match contact.fence() {
            Fence::Fenced { .. } | Fence::Frozen => {
                // Until the engine lifts the fence (or for good).
                lease_written = None;
                continue;
            }
            Fence::Disarmed => {
                // Nothing the backup holds can run: no lease, no fencing
                // (and a lease from when it could must not freeze the guest
                // later).
                if lease_written.take().is_some() {
                    guest.clear_lease();
                }
                continue;
            }
            Fence::Armed => {}
        }
        let deadline = contact.lease_deadline(timeout);
        let stale = lease_written.is_none_or(|w| deadline.abs_diff(w) > TICK.as_millis() as u64);
        if stale {
            if let Err(e) = guest.renew_lease(deadline) {
                warn!(vm = %guest.name(), "cannot renew the fence lease: {e}");
            }
            lease_written = Some(deadline);
        }
        let silent = contact.silent_for();
        if silent >= timeout && contact.begin_fence() {
            let why = format!("no word from the backup for {silent:?}");
            warn!(vm = %guest.name(), "{why}; fencing");
            let detail = match guest.fence(&why).await {
                Ok(paused) => {
                    // Paused cleanly: QEMU stays responsive to the operator
                    // rather than frozen by the shim, and the fence can be
                    // lifted if the backup answers before taking over.
                    guest.clear_lease();
                    contact.fenced(Fence::Fenced { paused });
                    format!("{why}; resumes if the backup answers before it takes over")
                }
                Err(e) => {
                    contact.fenced(Fence::Frozen);
                    format!("{why}; QMP stop failed ({e}), the shim's lease freezes QEMU")
                }
            };
            let mut s = status.lock();
            s.state = FtState::Fenced;
            s.detail = detail;
        }
    }
}
