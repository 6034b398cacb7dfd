//! The cluster's identity: a certificate authority, certificates that carry
//! a role, and the mutual-TLS plumbing every link between tandem processes
//! uses (manager ↔ host, operator ↔ manager, tandemd's host API, the
//! replication listener, and QEMU's own TLS for migration and NBD).
//!
//! # Shape
//!
//! ```text
//! ClusterCa::create(dir, cluster_name)      ca.pem + ca.key (0600) in dir (0700); never overwrites
//! ClusterCa::load(dir)                      refuses a ca.key readable by group/other, a key
//!                                           that is not the certificate's, a non-tandem CA
//! ca.cluster_id()                           32 hex chars: SHA-256 of the CA's public key, truncated
//! ca.issue(name, role, validity)            -> IssuedCert (PEM cert + PKCS#8 key, serial, not_after)
//! ca.issue_between(name, role, from, to)    explicit validity window (expired certs for tests)
//! ca.renew(&identity, validity)             same name and role, new key and serial
//! ca.identity(&issued)                      -> Identity (what the node then holds)
//! ca.backup(to, Some(pass) | None)          one file, 0600; an unencrypted one says so in the
//!                                           file, in a tracing warning and in BackupInfo::warning()
//! ClusterCa::restore(from, dir, pass)       the inverse; same no-overwrite rule as create
//! ca.qemu_tls_dir(out, &issued)             ca-cert.pem, server-{cert,key}.pem, client-{cert,key}.pem
//! ca.crl_pem(generation, &serials)          a signed CRL for QEMU; identity.qemu_crl(out, pem) -> ca-crl.pem
//!
//! Identity::{from_issued, from_pem, load(dir), save(dir)}   dir/identity.pem (0600), one atomic file
//! identity.{name, role, cluster_id, serial, not_after, expires_within, as_peer, qemu_tls_dir}
//!
//! server_config(&id, revoked)               rustls ServerConfig: client cert REQUIRED
//! server_config_for_roles(&id, revoked, &[Role])   ... and other roles fail the handshake
//! client_config(&id, revoked)               rustls ClientConfig: verifies the server the same way
//! server_name(peer_name)                    the ServerName to dial a peer by its certificate name
//! peer_of(&conn)                            -> Peer { name, role, cluster_id, serial, not_after }
//! peer.require_role(&[Role])                Err(WrongRole) for the caller to turn into a 403
//! accept(cfg, io) / connect(cfg, peer_name, io)   tokio-rustls handshake + peer_of in one call
//! PkiError::check_failure()                 which of this crate's checks refused a handshake
//!
//! trait Revocations { fn is_revoked(&self, serial) -> bool }
//! RevocationList::{new, open(path), revoke, replace(generation, serials)}  file replaced atomically
//! NoRevocations
//!
//! standalone_pair(dir, a, b) / standalone_renew(dir)   `tandem cluster init|renew --standalone`
//! ```
//!
//! # What a certificate says
//!
//! Every certificate the CA issues carries, besides the usual fields:
//!
//! - a **URI SAN `tandem://<cluster_id>/<role>/<name>`**: the authoritative
//!   identity. A URI SAN is the standard place for a structured workload
//!   identity (SPIFFE puts `spiffe://<trust-domain>/<path>` there), every
//!   tool shows it (`openssl x509 -text`), it needs no private OID or ASN.1
//!   of our own, and TLS stacks ignore it for host-name matching, so it
//!   cannot be confused with a DNS name. [`peer_of`] reads it back.
//! - a **DNS SAN `<name>`**, so that the client side checks the server by
//!   name with the ordinary webpki rules (`server_name(peer)`), and QEMU's
//!   `tls-hostname` works the same way.
//! - subject `CN=<name>, OU=<role>, O=tandem:<cluster_id>`: informative, and
//!   what QEMU's `tls-authz` (which matches x509 distinguished names) sees.
//! - extended key usage: host and manager certificates are both TLS server
//!   and client; operator certificates are client only, so an operator
//!   certificate can never serve. Key usage has digitalSignature and
//!   keyEncipherment (GnuTLS, hence QEMU, insists on the latter when the
//!   extension is critical, even for EC keys).
//!
//! The CA certificate carries `tandem://<cluster_id>/ca/<cluster_name>`. The
//! cluster id is derived from the CA's public key, so it survives a backup
//! and restore and cannot be claimed by another CA's certificates (those do
//! not chain to ours; the id check is defence in depth after the chain check).
//!
//! # Cryptography
//!
//! Keys are ECDSA P-256 (rcgen's default): QEMU's GnuTLS, OpenSSL tooling
//! and rustls all handle it, and ring implements it in constant time.
//! TLS is rustls with the `ring` provider, TLS 1.3 only (every peer is ours),
//! with session resumption disabled both ways so that every connection runs
//! the full certificate check: a revoked serial is refused on the next
//! connection, never resumed past. Long-lived streams must re-check
//! [`Revocations::is_revoked`] themselves if revocation has to cut them.
//!
//! Nothing here panics on input: PEM from disk, peer certificates and names
//! are all untrusted and come back as [`PkiError`].

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable
    )
)]

mod ca;
mod cert;
mod fsutil;
mod identity;
mod revocation;
mod standalone;
mod tls;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use ca::{
    BackupInfo, ClusterCa, IssuedCert, CA_CERT_FILE, CA_KEY_FILE, CA_VALIDITY, CLOCK_SKEW,
    MIN_PASSPHRASE_LEN,
};
pub use identity::{
    Identity, IDENTITY_FILE, QEMU_CA_CERT, QEMU_CA_CRL, QEMU_CLIENT_CERT, QEMU_CLIENT_KEY,
    QEMU_SERVER_CERT, QEMU_SERVER_KEY,
};
pub use revocation::{normalize_serial, NoRevocations, RevocationList, Revocations};
pub use standalone::{
    standalone_pair, standalone_renew, StandalonePair, STANDALONE_CLUSTER_NAME, STANDALONE_VALIDITY,
};
pub use tls::{
    accept, client_config, connect, peer_of, server_config, server_config_for_roles, server_name,
    Peer,
};

/// The TLS crates this one is built on, re-exported so that users name the
/// same versions (a `rustls::ServerConfig` from another rustls is another type).
pub use rustls;
pub use tokio_rustls;

/// The longest certificate name: one DNS label.
pub const MAX_NAME_LEN: usize = 63;

/// What a certificate's holder may do. It is part of the certificate, so a
/// host cannot present itself as an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A tandemd: host API server, replication peer, manager client.
    Host,
    /// The cluster manager.
    Manager,
    /// A person or script driving the manager (`tandem` CLI). Client only.
    Operator,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 3] = [Role::Host, Role::Manager, Role::Operator];

    /// The lowercase name used in certificates, files and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Manager => "manager",
            Role::Operator => "operator",
        }
    }

    /// Whether a certificate of this role may act as a TLS server.
    pub fn can_serve(self) -> bool {
        matches!(self, Role::Host | Role::Manager)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Role::Host),
            "manager" => Ok(Role::Manager),
            "operator" => Ok(Role::Operator),
            _ => Err(PkiError::InvalidRole(truncate_for_message(s))),
        }
    }
}

/// Checks a certificate (host, manager, operator or cluster) name: one DNS
/// label of lowercase letters, digits and `-`, 1 to 63 characters, not
/// starting or ending with `-`, and not a number (which TLS would take for
/// an IP address).
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason: &'static str| PkiError::InvalidName {
        name: truncate_for_message(name),
        reason,
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("is longer than 63 characters"));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad("has upper-case letters (names are lower-case)"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("may hold only a-z, 0-9 and '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(bad("starts or ends with '-'"));
    }
    if rustls_pki_types::DnsName::try_from(name).is_err() {
        return Err(bad("looks like a number (TLS would read it as an address)"));
    }
    Ok(())
}

/// Everything that can go wrong here. Messages name the file or the
/// certificate concerned.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite it")]
    AlreadyExists(PathBuf),
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid role {0:?} (expected host, manager or operator)")]
    InvalidRole(String),
    #[error("invalid certificate serial {0:?} (expected hex)")]
    InvalidSerial(String),
    #[error("{what}: {reason}")]
    Pem { what: String, reason: String },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("the private key does not belong to the certificate ({0})")]
    KeyMismatch(String),
    #[error("certificate validity: {0}")]
    Validity(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("certificate belongs to cluster {found}, not {expected}")]
    WrongCluster { expected: String, found: String },
    #[error("certificate serial {0} is revoked")]
    Revoked(String),
    #[error("{name} has role {role}; this needs {expected}")]
    WrongRole {
        name: String,
        role: Role,
        expected: String,
    },
    #[error("backup {path}: {reason}")]
    Backup { path: PathBuf, reason: String },
    #[error("backup {0} is encrypted: a passphrase is needed")]
    PassphraseRequired(PathBuf),
    #[error("backup {0}: wrong passphrase, or the file is damaged")]
    BadPassphrase(PathBuf),
    #[error("revocation list {path}: {reason}")]
    RevocationList { path: PathBuf, reason: String },
}

impl PkiError {
    /// For a handshake refused by one of this crate's own checks (wrong
    /// cluster, wrong role, not a tandem certificate), that check's error;
    /// `None` for other failures. (Revocations show as rustls's
    /// `CertificateError::Revoked`; chain, expiry and name failures as
    /// rustls's own certificate errors.)
    pub fn check_failure(&self) -> Option<&PkiError> {
        match self {
            PkiError::Tls(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(e),
            ))) => e.downcast_ref::<PkiError>(),
            _ => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PkiError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Echoing arbitrary input back in an error is useful up to a point.
pub(crate) fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", s.get(..end).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.to_string().parse::<Role>().unwrap(), r);
        }
        assert!("Host".parse::<Role>().is_err());
        assert!("ca".parse::<Role>().is_err());
        assert!("".parse::<Role>().is_err());
    }

    #[test]
    fn names() {
        for ok in ["a", "host-a", "h1", "1h", "0a1", &"a".repeat(63)] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a_b",
            "a b",
            "é",
            "123",
            "0x1f",
            &"a".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "é".repeat(100);
        let t = truncate_for_message(&s);
        assert!(t.len() < s.len());
    }
}
