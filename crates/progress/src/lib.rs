//! The project's one progress module. Long jobs (live migration now;
//! deployment, the initial replication copy and image builds next) report
//! through it, so every one of them shows progress the same way and none
//! grows its own.
//!
//! It owns:
//! - [`Tracker`]: the model. Its fraction never goes backwards, even when
//!   a job's remaining work grows again (a migrating guest re-dirties
//!   pages), and reaches 100 % only when the job is done: users' complaints
//!   about other tools are exactly progress that goes backwards and
//!   progress stuck at 99.99 %. Also a rate smoothed over time and an ETA.
//! - [`Event`]: one reading, and its `--json` line form.
//! - [`render_bar`], [`human_bytes`], [`human_rate`], [`human_duration`]
//!   and [`sanitize`]: the text a person reads, free of control characters
//!   whatever a VM's name or a peer's message holds.
//! - [`Reporter`]: the only part that does I/O: a bar rewritten in place
//!   on a terminal, plain rate-limited lines in a log, JSON lines with
//!   `--json`.
//!
//! Everything but [`Reporter`] is pure, with time passed in, so it is
//! tested without clocks or terminals.

mod event;
mod render;
mod reporter;
mod tracker;

pub use event::{Event, CANCELLED, DONE, FAILED, RUNNING};
pub use render::{human_bytes, human_duration, human_rate, render_bar, sanitize};
pub use reporter::{Mode, Reporter};
pub use tracker::{Sample, Tracker, MAX_UNFINISHED};
