//! Why a rule or a table was refused, and where.

use std::fmt;

/// Where in a table a rule error occurred, printed as a `rule N: ` prefix
/// when known. A single rule parsed on its own has no position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position(pub Option<usize>);

impl Position {
    pub const NONE: Position = Position(None);
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "rule {n}: "),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RuleError {
    #[error("{at}empty rule: expected `hold` or `pass` followed by clauses")]
    Empty { at: Position },
    #[error("{at}unknown class `{token}`: a rule starts with `hold` or `pass`")]
    UnknownClass { at: Position, token: String },
    #[error(
        "{at}unknown keyword `{token}` (expected from, any, arp, ipv4, ipv6, ethertype, tcp, \
         udp, proto, sport, dport, flags or payload)"
    )]
    UnknownKeyword { at: Position, token: String },
    #[error("{at}`{token}` repeats the {clause} clause; each clause may appear once")]
    DuplicateClause {
        at: Position,
        clause: &'static str,
        token: String,
    },
    #[error("{at}`{keyword}` needs a value: {expected}")]
    MissingValue {
        at: Position,
        keyword: &'static str,
        expected: &'static str,
    },
    #[error("{at}`{keyword} {value}`: expected {expected}")]
    BadValue {
        at: Position,
        keyword: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{at}`{keyword}` port `{value}` is out of range (0-65535)")]
    PortOutOfRange {
        at: Position,
        keyword: &'static str,
        value: String,
    },
    #[error("{at}`{keyword} {value}`: the range ends before it starts")]
    ReversedPortRange {
        at: Position,
        keyword: &'static str,
        value: String,
    },
    #[error("{at}ethertype `{value}` is below 0x0600, which makes it an 802.3 length field")]
    EthertypeTooSmall { at: Position, value: String },
    #[error("{at}`proto {value}` is out of range (0-255)")]
    ProtoOutOfRange { at: Position, value: String },
    #[error(
        "{at}unknown TCP flag `{token}` (expected +name or -name with fin, syn, rst, psh, ack, \
         urg, ece or cwr)"
    )]
    UnknownFlag { at: Position, token: String },
    #[error("{at}TCP flag `{flag}` is given more than once in `flags`")]
    RepeatedFlag { at: Position, flag: String },
    #[error("{at}`{keyword}` requires {needs} in the same rule")]
    NeedsTransport {
        at: Position,
        keyword: &'static str,
        needs: &'static str,
    },
    #[error("{at}contradictory rule: {detail}")]
    Contradiction { at: Position, detail: String },
    #[error("{at}`payload {value}` matches nothing: the byte string is empty")]
    EmptyPayload { at: Position, value: String },
    #[error("{at}payload byte string is {len} bytes; at most 64 are allowed")]
    PayloadTooLong { at: Position, len: usize },
    #[error("{at}payload offset `{value}` is too large (at most 1500)")]
    PayloadOffsetTooLarge { at: Position, value: String },
    #[error("{at}unterminated double quote in `{token}`")]
    UnterminatedQuote { at: Position, token: String },
    #[error("{at}unsupported escape `{sequence}` in quoted payload (only \\\" and \\\\)")]
    BadEscape { at: Position, sequence: String },
    #[error("no rule at index {index}: the table has {len} rules")]
    IndexOutOfRange { index: usize, len: usize },
    #[error("unknown profile `{name}` (known profiles: {known})")]
    UnknownProfile { name: String, known: String },
}

impl RuleError {
    /// The 1-based rule position the error refers to, when known.
    pub fn position(&self) -> Option<usize> {
        self.clone().at_mut().and_then(|at| at.0)
    }

    /// Tags the error with the 1-based position of the rule that caused it.
    pub fn at_rule(mut self, position: usize) -> RuleError {
        if let Some(at) = self.at_mut() {
            at.0 = Some(position);
        }
        self
    }

    fn at_mut(&mut self) -> Option<&mut Position> {
        match self {
            RuleError::Empty { at }
            | RuleError::UnknownClass { at, .. }
            | RuleError::UnknownKeyword { at, .. }
            | RuleError::DuplicateClause { at, .. }
            | RuleError::MissingValue { at, .. }
            | RuleError::BadValue { at, .. }
            | RuleError::PortOutOfRange { at, .. }
            | RuleError::ReversedPortRange { at, .. }
            | RuleError::EthertypeTooSmall { at, .. }
            | RuleError::ProtoOutOfRange { at, .. }
            | RuleError::UnknownFlag { at, .. }
            | RuleError::RepeatedFlag { at, .. }
            | RuleError::NeedsTransport { at, .. }
            | RuleError::Contradiction { at, .. }
            | RuleError::EmptyPayload { at, .. }
            | RuleError::PayloadTooLong { at, .. }
            | RuleError::PayloadOffsetTooLarge { at, .. }
            | RuleError::UnterminatedQuote { at, .. }
            | RuleError::BadEscape { at, .. } => Some(at),
            RuleError::IndexOutOfRange { .. } | RuleError::UnknownProfile { .. } => None,
        }
    }
}
