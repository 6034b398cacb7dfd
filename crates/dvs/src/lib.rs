//! `tandem-dvs`: the distributed switch, as the manager sees it.
//!
//! This crate owns three pure pieces of issue 16 (seed 000 across hosts),
//! none of which does I/O or reads a clock (times are passed in as unix
//! milliseconds):
//!
//! - [`document`]: the DVS document — shared `[switch]` settings and
//!   `[[port_group]]`s, and per `[[host]]` that host's uplinks and host
//!   ports — its complete validation with field paths, and
//!   [`DvsDocument::render`], which gives the one-host
//!   [`SwitchDocument`](tandem_switch_core::config::SwitchDocument) a host
//!   runs (and compares by its digest);
//! - [`rollout`]: the plan of a change across hosts (a canary first, then
//!   the rest in parallel, stop at the first failure and revert exactly the
//!   hosts that committed) and its outcome;
//! - [`txn`]: the manager's state machine for one host's switch
//!   (in-sync → pending: awaiting the return → awaiting the commit's
//!   acknowledgement → in sync at the new revision; or out of sync, then
//!   resynced by the host's own report, or failed).
//!
//! The manager (`tandem-manager`) stores these, talks to the hosts and
//! drives the rollout; tandemd runs each host's side of the transaction.
//! See docs/cluster.md, "Distributed switch".

pub mod document;
pub mod rollout;
pub mod txn;

pub use document::{DvsDocument, DvsHost, InvalidDvs};
pub use rollout::{HostResult, Rollout, RolloutOutcome, RolloutPlan, Step};
pub use txn::{HostSwitch, OutOfSyncReason, ReturnFailure, SyncState, TxnPhase};
