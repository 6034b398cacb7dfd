//! An NBD server that is the target of QEMU's `blockdev-mirror`.
//!
//! On the primary, QEMU mirrors each protected disk to an export served
//! here, first with `sync=full`, then with `copy-mode=write-blocking`, so a
//! guest write completes only after this server has replied to it. The
//! server applies every write to a backing file (reads come from that file,
//! so QEMU sees a coherent target) and appends it to the export's current
//! [`WriteLog`]. At each epoch boundary, with the VM stopped, the owner calls
//! [`Export::take_writes`] and attaches the log to that epoch; the backup
//! applies it with [`WriteLog::apply_to`] only when the epoch commits.
//!
//! [`proto`] is the pure protocol layer; the server is a thin I/O shell
//! around it.
//!
//! Choices worth knowing:
//! - Simple replies only: structured replies, metadata contexts, extended
//!   headers and TLS are answered `NBD_REP_ERR_UNSUP`; QEMU falls back.
//! - A request out of the export's range is failed with the spec's error
//!   (ENOSPC for WRITE/WRITE_ZEROES, EINVAL for READ/TRIM), never a
//!   disconnect. A READ or WRITE over 32 MiB is failed with EINVAL; the
//!   WRITE's payload is read and discarded in bounded chunks first so the
//!   stream stays framed. Only a broken frame (bad magic, bad handshake,
//!   an option over 64 KiB) ends a connection.
//! - TRIM is applied and logged as a zero write, so primary target and
//!   replica read the same afterwards whatever either file system does
//!   with discards.
//! - Writes and their log entries are ordered by one lock per export, so
//!   a [`Export::take_writes`] is an exact cut even with several
//!   connections writing at once.
//! - The log is bounded in bytes ([`Export::set_log_cap`], default
//!   [`DEFAULT_LOG_CAP`]): past the cap it is dropped and the next take
//!   returns [`LogOverflow`], which means "resend the whole backing file".
//! - The owner can watch the one client it connects
//!   ([`Export::expect_client`], [`Export::client_check`]): a refused write,
//!   the connection ending or a second client is remembered at once, so
//!   whether the log holds every write the client sent is known without a
//!   round trip to it.

mod client;
mod pending;
pub mod proto;
mod server;
mod writelog;
mod zero;

use std::io;
use std::path::PathBuf;

pub use client::{ClientFault, ClientToken};
pub use pending::{LogOverflow, DEFAULT_LOG_CAP};
pub use server::{
    serve_stream, serve_tcp, serve_unix, Export, ExportStats, ServerHandle, DEFAULT_EXPORT_NAME,
};
pub use writelog::{DecodeError, DiskWrite, WriteLog};

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("backing file {path} is {actual} bytes, but the export is {expected} bytes")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("export size {0} exceeds the largest file offset")]
    TooLarge(u64),
    #[error("invalid NBD configuration: {0}")]
    Config(String),
    #[error("NBD server task failed: {0}")]
    Task(String),
}

impl NbdError {
    fn io(what: impl Into<String>, source: io::Error) -> Self {
        NbdError::Io {
            what: what.into(),
            source,
        }
    }
}
