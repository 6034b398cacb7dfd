//! Everything the planner refuses, with the names the operator typed.

use serde::{Deserialize, Serialize};

/// Why a matrix, request, placement, state or event was refused. Each
/// message names what was wrong as the operator wrote it; the enum is
/// serde so that a manager can store a refused request's reason beside it.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "error")]
pub enum PlanError {
    #[error("unknown host {0:?}")]
    UnknownHost(String),
    #[error("host {0:?} is listed twice")]
    DuplicateHost(String),
    #[error("a host name may not be empty")]
    EmptyHostName,
    #[error("a deployment needs at least one target host besides the source")]
    NoTargets,
    #[error("a link from host {0:?} to itself")]
    SelfLink(String),
    #[error("link {from:?} -> {to:?}: nothing is ever copied to the source host")]
    LinkIntoSource { from: String, to: String },
    #[error(
        "link {from:?} -> {to:?}: the deployment time must be a finite number >= 0, got {time}"
    )]
    BadTime { from: String, to: String, time: f64 },
    #[error("a transfer rate must be a finite number > 0 bytes/s, got {0}")]
    BadRate(f64),
    #[error("no link {from:?} -> {to:?} in the matrix")]
    NoLink { from: String, to: String },
    #[error("host {0:?}: egress must allow at least one copy at a time")]
    ZeroEgress(String),
    #[error("the number of copies must be at least 1")]
    ZeroCount,
    #[error("the image is empty (0 bytes)")]
    EmptyImage,
    #[error("datastore {0:?} is listed twice")]
    DuplicateDatastore(String),
    #[error("unknown datastore {0:?}")]
    UnknownDatastore(String),
    #[error("datastore {0:?} is attached to no host")]
    DetachedDatastore(String),
    #[error("datastore {datastore:?} is not attached to host {host:?}")]
    NotAttached { datastore: String, host: String },
    #[error("host {0:?} has no datastore to hold copies")]
    NoDatastore(String),
    #[error(
        "host {host:?}: no datastore has room for another copy of {image_bytes} bytes \
         (the most room left is {free_bytes} bytes, on {datastore:?})"
    )]
    NoRoom {
        host: String,
        datastore: String,
        free_bytes: u64,
        image_bytes: u64,
    },
    #[error("the datastores have room for only {placed} of the {requested} copies")]
    NotEnoughRoom { placed: u32, requested: u32 },
    #[error("{requested} copies asked for; one deployment makes at most {limit}")]
    TooManyCopies { requested: u64, limit: u64 },
    #[error("no route from the source to host {0:?}")]
    NoRoute(String),
    #[error("{what} must be a finite number >= 0, got {value}")]
    BadNumber { what: String, value: f64 },
    #[error(
        "transfer {from:?} -> {to:?}: the done fraction must be between 0 and 1, got {fraction}"
    )]
    BadFraction {
        from: String,
        to: String,
        fraction: f64,
    },
    #[error("transfer {from:?} -> {to:?} started at {started_at}, after now ({now})")]
    StartedInFuture {
        from: String,
        to: String,
        started_at: f64,
        now: f64,
    },
    #[error("no transfer {from:?} -> {to:?} is in flight")]
    NoSuchTransfer { from: String, to: String },
    #[error("a transfer {from:?} -> {to:?} is in flight already")]
    DuplicateTransfer { from: String, to: String },
    #[error("time may not run backwards: now is {now}, asked for {asked}")]
    TimeBackwards { now: f64, asked: f64 },
}

/// A check shared by every number that is a duration or a point in time.
pub(crate) fn non_negative(what: &str, value: f64) -> Result<f64, PlanError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(PlanError::BadNumber {
            what: what.to_string(),
            value,
        })
    }
}
