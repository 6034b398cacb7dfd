//! Live migration's decisions, kept apart from QEMU and sockets so that
//! they are tested without either:
//!
//! - [`sample`]: QEMU's `query-migrate` answer read into a typed
//!   [`Sample`] (nothing in it trusted to be present or sane);
//! - [`ladder`]: stall detection and the convergence ladder (downtime
//!   steps, throttle, postcopy, abort), the QMP settings a migration
//!   starts with and the command each rung sends.
//!
//! The driver that talks to QEMU feeds samples in and carries out the
//! [`Action`]s that come back; time is passed in (milliseconds on the
//! driver's monotonic clock).

pub mod ladder;
pub mod sample;

pub use ladder::{setup, Action, ConfigError, Decision, Ladder, LadderConfig, Outcome, Rung};
pub use sample::{Sample, SampleError, Status};
