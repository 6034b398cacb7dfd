//! What the supervisor's operations fail with.

use tandem_api::VmState;
use tandem_qmp::QmpError;
use tandem_vmspec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("no VM named `{0}`")]
    NotFound(String),
    #[error("a VM named `{0}` already exists")]
    Exists(String),
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    #[error("VM `{name}` is {state}; cannot {op}")]
    BadState {
        name: String,
        state: VmState,
        op: &'static str,
    },
    #[error("QEMU for `{name}` failed to start: {message}")]
    Start {
        name: String,
        message: String,
        qemu_log_tail: Vec<String>,
    },
    #[error("checkpoint of `{name}` failed: {message}")]
    Checkpoint { name: String, message: String },
    #[error("QMP error on `{name}`: {source}")]
    Qmp { name: String, source: QmpError },
    /// A request the supervisor will not carry out as asked (a checkpoint
    /// directory outside the checkpoint root, a manifest naming files
    /// outside its checkpoint); the message says why.
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

pub(super) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let context = context.into();
    move |source| SupervisorError::Io { context, source }
}
