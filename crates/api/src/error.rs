//! The kinds of error tandemd answers with, and their HTTP statuses.

use serde::{Deserialize, Serialize};

use crate::{ErrorBody, FieldProblem};

/// What went wrong, as [`ErrorBody::kind`] says it: a stable word, each
/// with one HTTP status. These are all the kinds tandemd sends
/// (docs/supervisor.md, "Errors", lists the same); a client also invents
/// `http` for an answer that is not an [`ErrorBody`] (a request tandemd
/// could not parse, an unknown route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// 404: no such VM; or, on this host, the VM is not protected, has no
    /// output commit, or has no replica to fail over to.
    NotFound,
    /// 409: it exists already (a VM of that name, a protection, a VM a
    /// failover would start).
    Conflict,
    /// 409: the VM's state (or its replica's) does not allow the operation.
    BadState,
    /// 400: the VM spec is invalid; `fields` lists every problem.
    InvalidSpec,
    /// 400: the switch document is invalid; `fields` lists every problem.
    InvalidDocument,
    /// 400: a request's parameter is invalid.
    Invalid,
    /// 403: the caller may not make this request on this socket (not
    /// root nor in tandemd's `--api-group`; a change on the read-only
    /// socket).
    Forbidden,
    /// 502: QEMU failed to start, or a QMP command failed.
    Qemu,
    /// 502: saving or loading QEMU's device state failed.
    Checkpoint,
    /// 500: a failover could not run the VM here.
    Failover,
    /// 409: the switch could not apply a valid document; the previous
    /// configuration is still in effect.
    Switch,
    /// 409: a switch transaction is pending on this host; one at a time.
    Busy,
    /// 409: a commit for a transaction other than the pending one (an old
    /// one's commit, delayed): ignored, the pending one keeps its deadline.
    StaleTxid,
    /// 409: a commit when nothing is pending: the transaction was rolled
    /// back at its deadline (a late commit) or never existed. Nothing
    /// changes.
    UnknownTxid,
    /// 500: anything else (the host's file system, a task that died).
    Internal,
}

impl ErrorKind {
    /// Every kind, in the order the documentation lists them.
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::NotFound,
        ErrorKind::Conflict,
        ErrorKind::BadState,
        ErrorKind::InvalidSpec,
        ErrorKind::InvalidDocument,
        ErrorKind::Invalid,
        ErrorKind::Forbidden,
        ErrorKind::Qemu,
        ErrorKind::Checkpoint,
        ErrorKind::Failover,
        ErrorKind::Switch,
        ErrorKind::Busy,
        ErrorKind::StaleTxid,
        ErrorKind::UnknownTxid,
        ErrorKind::Internal,
    ];

    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::BadState => "bad-state",
            ErrorKind::InvalidSpec => "invalid-spec",
            ErrorKind::InvalidDocument => "invalid-document",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Qemu => "qemu",
            ErrorKind::Checkpoint => "checkpoint",
            ErrorKind::Failover => "failover",
            ErrorKind::Switch => "switch",
            ErrorKind::Busy => "busy",
            ErrorKind::StaleTxid => "stale-txid",
            ErrorKind::UnknownTxid => "unknown-txid",
            ErrorKind::Internal => "internal",
        }
    }

    /// The HTTP status every answer of this kind has.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidSpec | ErrorKind::InvalidDocument | ErrorKind::Invalid => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict
            | ErrorKind::BadState
            | ErrorKind::Switch
            | ErrorKind::Busy
            | ErrorKind::StaleTxid
            | ErrorKind::UnknownTxid => 409,
            ErrorKind::Failover | ErrorKind::Internal => 500,
            ErrorKind::Qemu | ErrorKind::Checkpoint => 502,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not one of [`ErrorKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an error kind")]
pub struct UnknownErrorKind(pub String);

impl std::str::FromStr for ErrorKind {
    type Err = UnknownErrorKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownErrorKind(s.to_string()))
    }
}

impl ErrorBody {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorBody {
            kind: kind.as_str().to_string(),
            message: message.into(),
            fields: Vec::new(),
        }
    }

    pub fn with_fields(mut self, fields: Vec<FieldProblem>) -> Self {
        self.fields = fields;
        self
    }

    /// The kind, when it is one this build knows.
    pub fn error_kind(&self) -> Option<ErrorKind> {
        self.kind.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The "Errors" table of docs/supervisor.md: `(kind, status)` rows.
    fn documented() -> Vec<(String, u16)> {
        let doc = include_str!("../../../docs/supervisor.md");
        let section = doc
            .split("\n### Errors\n")
            .nth(1)
            .expect("docs/supervisor.md has an `### Errors` section");
        section
            .lines()
            .skip_while(|l| !l.starts_with("| kind"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let kind = cells[1].trim_matches('`').to_string();
                let status = cells[2].parse().expect("a status code");
                (kind, status)
            })
            .collect()
    }

    #[test]
    fn every_kind_has_its_status_and_is_documented() {
        let documented = documented();
        assert_eq!(documented.len(), ErrorKind::ALL.len(), "{documented:?}");
        for kind in ErrorKind::ALL {
            let status = kind.status();
            assert!(
                matches!(status, 400 | 403 | 404 | 409 | 500 | 502),
                "{kind}: {status}"
            );
            assert!(
                documented.contains(&(kind.as_str().to_string(), status)),
                "{kind} ({status}) is not in the documented table {documented:?}"
            );
            // Serialised as the word, and read back from it.
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<ErrorKind>(&json).unwrap(), kind);
            assert_eq!(kind.as_str().parse::<ErrorKind>(), Ok(kind));
            assert_eq!(ErrorBody::new(kind, "m").error_kind(), Some(kind), "{kind}");
        }
        assert!("supervisor".parse::<ErrorKind>().is_err());
    }

    /// An error body is the JSON it always was.
    #[test]
    fn error_body_json_is_unchanged() {
        let body = ErrorBody::new(ErrorKind::InvalidSpec, "invalid VM spec: x").with_fields(vec![
            FieldProblem {
                field: "vcpus".into(),
                message: "must be at least 1".into(),
            },
        ]);
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"kind":"invalid-spec","message":"invalid VM spec: x","fields":[{"field":"vcpus","message":"must be at least 1"}]}"#
        );
        let body = ErrorBody::new(ErrorKind::NotFound, "no VM named `x`");
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"kind":"not-found","message":"no VM named `x`"}"#
        );
    }
}
