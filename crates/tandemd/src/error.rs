//! The one place tandemd turns errors into HTTP answers: every library
//! error a route can meet maps to an [`ErrorKind`] here, and the kind
//! alone decides the status (docs/supervisor.md, "Errors").

use std::fmt::Display;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tandem_api::{ErrorBody, ErrorKind, FieldProblem};
use tandem_replication::backup::TakeoverError;
use tandem_replication::link::BadEndpoint;
use tandem_replication::tracker::UnknownTracker;
use tandem_supervisor::SupervisorError;
use tandem_switch::config::InvalidDocument;
use tandem_switch::host::HostError;
use tandem_vmspec::SpecError;

use crate::ftdisk::MirrorError;

/// An error on its way to the client.
#[derive(Debug)]
pub struct HttpError {
    kind: ErrorKind,
    message: String,
    fields: Vec<FieldProblem>,
}

impl HttpError {
    pub fn new(kind: ErrorKind, message: impl Display) -> Self {
        HttpError {
            kind,
            message: message.to_string(),
            fields: Vec::new(),
        }
    }

    /// A request parameter is wrong.
    pub fn invalid(message: impl Display) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    pub fn not_found(message: impl Display) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn conflict(message: impl Display) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    #[cfg(test)]
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn with_fields(mut self, fields: Vec<FieldProblem>) -> Self {
        self.fields = fields;
        self
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody::new(self.kind, self.message).with_fields(self.fields);
        (status, Json(body)).into_response()
    }
}

impl From<SupervisorError> for HttpError {
    fn from(e: SupervisorError) -> Self {
        let kind = match &e {
            SupervisorError::InvalidSpec(_) => ErrorKind::InvalidSpec,
            SupervisorError::NotFound(_) => ErrorKind::NotFound,
            SupervisorError::Exists(_) => ErrorKind::Conflict,
            SupervisorError::BadState { .. } => ErrorKind::BadState,
            SupervisorError::Start { .. } | SupervisorError::Qmp { .. } => ErrorKind::Qemu,
            SupervisorError::Checkpoint { .. } => ErrorKind::Checkpoint,
            SupervisorError::Refused(_) => ErrorKind::Invalid,
            SupervisorError::Io { .. } => ErrorKind::Internal,
        };
        if let SupervisorError::InvalidSpec(spec) = e {
            return spec.into();
        }
        let mut message = e.to_string();
        if let SupervisorError::Start { qemu_log_tail, .. } = &e {
            if !qemu_log_tail.is_empty() {
                message.push_str("\nQEMU said:\n  ");
                message.push_str(&qemu_log_tail.join("\n  "));
            }
        }
        HttpError::new(kind, message)
    }
}

impl From<SpecError> for HttpError {
    fn from(e: SpecError) -> Self {
        let fields = e
            .field_errors()
            .iter()
            .map(|f| FieldProblem {
                field: f.field.clone(),
                message: f.message.clone(),
            })
            .collect();
        HttpError::new(ErrorKind::InvalidSpec, e).with_fields(fields)
    }
}

impl From<InvalidDocument> for HttpError {
    fn from(e: InvalidDocument) -> Self {
        let message = e.to_string();
        let fields =
            e.0.into_iter()
                .map(|p| FieldProblem {
                    field: p.field,
                    message: p.message,
                })
                .collect();
        HttpError::new(ErrorKind::InvalidDocument, message).with_fields(fields)
    }
}

/// The switch's errors reach the API only from `switch apply`, which
/// changes nothing unless the whole document applies.
impl From<HostError> for HttpError {
    fn from(e: HostError) -> Self {
        match e {
            HostError::Invalid(doc) => doc.into(),
            e => HttpError::new(
                ErrorKind::Switch,
                format!("{e}; the previous configuration is still in effect"),
            ),
        }
    }
}

impl From<MirrorError> for HttpError {
    fn from(e: MirrorError) -> Self {
        let kind = match &e {
            MirrorError::Qmp(_) | MirrorError::NoBlockNode(_) | MirrorError::Mirror { .. } => {
                ErrorKind::Qemu
            }
            MirrorError::WorkDir { .. } | MirrorError::Nbd(_) => ErrorKind::Internal,
        };
        HttpError::new(kind, e)
    }
}

impl From<TakeoverError> for HttpError {
    fn from(e: TakeoverError) -> Self {
        let kind = match &e {
            TakeoverError::NoReplica(_) => ErrorKind::NotFound,
            TakeoverError::AlreadyRunning { .. } => ErrorKind::Conflict,
            TakeoverError::NotConsistent { .. } => ErrorKind::BadState,
            TakeoverError::PrimaryHeard(_) | TakeoverError::Activate { .. } => ErrorKind::Failover,
        };
        HttpError::new(kind, e)
    }
}

impl From<BadEndpoint> for HttpError {
    fn from(e: BadEndpoint) -> Self {
        HttpError::invalid(e)
    }
}

impl From<UnknownTracker> for HttpError {
    fn from(e: UnknownTracker) -> Self {
        HttpError::invalid(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_api::VmState;

    fn io() -> std::io::Error {
        std::io::Error::other("disk on fire")
    }

    /// Each library error lands on its kind, whichever route met it, and
    /// its status is the kind's.
    #[test]
    fn library_errors_map_to_their_kind() {
        let spec = tandem_vmspec::parse_and_validate("vcpus = 0", |_| true).unwrap_err();
        let cases: Vec<(HttpError, ErrorKind)> = vec![
            (
                SupervisorError::NotFound("a".into()).into(),
                ErrorKind::NotFound,
            ),
            (
                SupervisorError::Exists("a".into()).into(),
                ErrorKind::Conflict,
            ),
            (
                SupervisorError::BadState {
                    name: "a".into(),
                    state: VmState::Defined,
                    op: "pause",
                }
                .into(),
                ErrorKind::BadState,
            ),
            (
                SupervisorError::Start {
                    name: "a".into(),
                    message: "m".into(),
                    qemu_log_tail: vec![],
                }
                .into(),
                ErrorKind::Qemu,
            ),
            (
                SupervisorError::Checkpoint {
                    name: "a".into(),
                    message: "m".into(),
                }
                .into(),
                ErrorKind::Checkpoint,
            ),
            (
                SupervisorError::Io {
                    context: "c".into(),
                    source: io(),
                }
                .into(),
                ErrorKind::Internal,
            ),
            (
                SupervisorError::InvalidSpec(spec).into(),
                ErrorKind::InvalidSpec,
            ),
            (
                SupervisorError::Refused("outside the root".into()).into(),
                ErrorKind::Invalid,
            ),
            (
                HttpError::new(ErrorKind::Forbidden, "not root"),
                ErrorKind::Forbidden,
            ),
            (InvalidDocument(vec![]).into(), ErrorKind::InvalidDocument),
            (
                HostError::Invalid(InvalidDocument(vec![])).into(),
                ErrorKind::InvalidDocument,
            ),
            (
                HostError::Port {
                    what: "w".into(),
                    why: "y".into(),
                }
                .into(),
                ErrorKind::Switch,
            ),
            (MirrorError::NoBlockNode("n".into()).into(), ErrorKind::Qemu),
            (
                MirrorError::WorkDir {
                    path: "/w".into(),
                    source: io(),
                }
                .into(),
                ErrorKind::Internal,
            ),
            (
                TakeoverError::NoReplica("a".into()).into(),
                ErrorKind::NotFound,
            ),
            (
                TakeoverError::PrimaryHeard("a".into()).into(),
                ErrorKind::Failover,
            ),
            (BadEndpoint("x".into()).into(), ErrorKind::Invalid),
            (UnknownTracker("x".into()).into(), ErrorKind::Invalid),
            (HttpError::invalid("x"), ErrorKind::Invalid),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e:?}");
            assert_eq!(e.status().as_u16(), kind.status(), "{e:?}");
        }
    }

    #[test]
    fn start_failure_carries_qemus_words_and_spec_errors_their_fields() {
        let e: HttpError = SupervisorError::Start {
            name: "a".into(),
            message: "QEMU exited at once".into(),
            qemu_log_tail: vec!["bad option".into()],
        }
        .into();
        assert_eq!(
            e.message,
            "QEMU for `a` failed to start: QEMU exited at once\nQEMU said:\n  bad option"
        );
        let spec = tandem_vmspec::parse_and_validate(
            "name = \"x\"\nvcpus = 0\nmemory_mib = 128\n[boot]\nkernel = \"/k\"\ninitrd = \"/i\"\n",
            |_| true,
        )
        .unwrap_err();
        let e: HttpError = SupervisorError::InvalidSpec(spec).into();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.fields.iter().any(|f| f.field == "vcpus"), "{e:?}");
    }
}
