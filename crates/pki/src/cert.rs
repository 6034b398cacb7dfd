//! Reading tandem certificates back: the URI SAN, the serial, the times.
//! Every function here takes untrusted bytes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{truncate_for_message, validate_name, PkiError, Role};

/// The scheme of the identity URI SAN.
pub(crate) const URI_SCHEME: &str = "tandem://";
/// The role segment of the CA certificate's own URI.
pub(crate) const CA_ROLE: &str = "ca";
/// Hex characters in a cluster id (128 bits).
pub(crate) const CLUSTER_ID_LEN: usize = 32;

/// What a node certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeafInfo {
    pub name: String,
    pub role: Role,
    pub cluster_id: String,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub spki: Vec<u8>,
}

/// What the CA certificate says about the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CaInfo {
    pub cluster_id: String,
    pub cluster_name: String,
    pub not_after: SystemTime,
    pub spki: Vec<u8>,
}

/// The cluster id of a CA with this SubjectPublicKeyInfo (DER): the first
/// 128 bits of its SHA-256, in lowercase hex.
pub(crate) fn cluster_id_of_spki(spki_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    digest
        .as_ref()
        .iter()
        .take(CLUSTER_ID_LEN / 2)
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn valid_cluster_id(s: &str) -> bool {
    s.len() == CLUSTER_ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(crate) fn identity_uri(cluster_id: &str, role: &str, name: &str) -> String {
    format!("{URI_SCHEME}{cluster_id}/{role}/{name}")
}

/// Splits `tandem://<cluster_id>/<role>/<name>`, checking the id and name.
fn parse_uri(uri: &str) -> Result<(String, String, String), PkiError> {
    let bad = |why: &str| {
        PkiError::Certificate(format!(
            "identity URI {:?}: {why}",
            truncate_for_message(uri)
        ))
    };
    let rest = uri
        .strip_prefix(URI_SCHEME)
        .ok_or_else(|| bad("not tandem://"))?;
    let mut parts = rest.split('/');
    let (Some(id), Some(role), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("expected tandem://<cluster>/<role>/<name>"));
    };
    if !valid_cluster_id(id) {
        return Err(bad("malformed cluster id"));
    }
    validate_name(name)?;
    Ok((id.to_string(), role.to_string(), name.to_string()))
}

/// Lowercase hex of a DER INTEGER's content bytes, without leading zero
/// bytes: the serial as [`crate::IssuedCert::serial`] and [`crate::Peer`] give it.
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    let s: String = raw.iter().skip(start).map(|b| format!("{b:02x}")).collect();
    if s.is_empty() {
        "00".to_string()
    } else {
        s
    }
}

pub(crate) fn system_time_from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(secs.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    }
}

/// Converts without the panics of `OffsetDateTime::from(SystemTime)`.
pub(crate) fn offset_from_system(t: SystemTime) -> Result<OffsetDateTime, PkiError> {
    let secs: i64 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).map_err(|_| out_of_range())?,
        Err(e) => i64::try_from(e.duration().as_secs())
            .map(|s| -s)
            .map_err(|_| out_of_range())?,
    };
    OffsetDateTime::from_unix_timestamp(secs).map_err(|_| out_of_range())
}

fn out_of_range() -> PkiError {
    PkiError::Validity("time out of range".into())
}

fn parse_der<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, PkiError> {
    // x509-parser reads past damage outside the signed part (the outer
    // SEQUENCE tag, the signature algorithm's tags), so a certificate with
    // flipped bytes there would pass our checks and then be refused by the
    // peer's TLS stack. webpki's parser is the strict DER one rustls uses:
    // refuse here what a handshake would refuse.
    let strict = CertificateDer::from(der);
    webpki::EndEntityCert::try_from(&strict)
        .map_err(|e| PkiError::Certificate(format!("malformed certificate (strict DER): {e}")))?;
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::Certificate(format!("unreadable certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(PkiError::Certificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    Ok(cert)
}

/// The one `tandem://` URI and the DNS names of a certificate.
fn sans<'a>(cert: &'a X509Certificate<'a>) -> Result<(&'a str, Vec<&'a str>), PkiError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Certificate(format!("subject alternative names: {e}")))?
        .ok_or_else(|| PkiError::Certificate("not a tandem certificate (no SAN)".into()))?;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    for gn in &san.value.general_names {
        match gn {
            GeneralName::URI(u) if u.starts_with(URI_SCHEME) => uris.push(*u),
            GeneralName::DNSName(d) => dns.push(*d),
            _ => {}
        }
    }
    match uris.as_slice() {
        [one] => Ok((one, dns)),
        [] => Err(PkiError::Certificate(
            "not a tandem certificate (no tandem:// URI)".into(),
        )),
        _ => Err(PkiError::Certificate("more than one tandem:// URI".into())),
    }
}

/// Reads a node (host, manager, operator) certificate.
pub(crate) fn parse_leaf(der: &[u8]) -> Result<LeafInfo, PkiError> {
    let cert = parse_der(der)?;
    if cert.is_ca() {
        return Err(PkiError::Certificate(
            "a CA certificate is not a node certificate".into(),
        ));
    }
    let (uri, dns) = sans(&cert)?;
    let (cluster_id, role, name) = parse_uri(uri)?;
    let role: Role = role.parse()?;
    if dns.as_slice() != [name.as_str()] {
        return Err(PkiError::Certificate(format!(
            "DNS names {dns:?} do not match the identity name {name:?}"
        )));
    }
    let validity = cert.validity();
    Ok(LeafInfo {
        name,
        role,
        cluster_id,
        serial: serial_hex(cert.raw_serial()),
        not_before: system_time_from_unix(validity.not_before.timestamp()),
        not_after: system_time_from_unix(validity.not_after.timestamp()),
        spki: cert.public_key().raw.to_vec(),
    })
}

/// Reads a cluster CA certificate and checks that its cluster id is the
/// one its own key gives.
pub(crate) fn parse_ca(der: &[u8]) -> Result<CaInfo, PkiError> {
    let cert = parse_der(der)?;
    if !cert.is_ca() {
        return Err(PkiError::Certificate("not a CA certificate".into()));
    }
    let (uri, _) = sans(&cert)?;
    let (cluster_id, role, cluster_name) = parse_uri(uri)?;
    if role != CA_ROLE {
        return Err(PkiError::Certificate(
            "not a cluster CA certificate (URI role is not `ca`)".into(),
        ));
    }
    let spki = cert.public_key().raw.to_vec();
    let derived = cluster_id_of_spki(&spki);
    if derived != cluster_id {
        return Err(PkiError::Certificate(format!(
            "CA certificate claims cluster {cluster_id} but its key gives {derived}"
        )));
    }
    cert.verify_signature(None)
        .map_err(|e| PkiError::Certificate(format!("CA certificate self-signature: {e}")))?;
    Ok(CaInfo {
        cluster_id,
        cluster_name,
        not_after: system_time_from_unix(cert.validity().not_after.timestamp()),
        spki,
    })
}

/// Checks that `leaf` was signed by the CA whose certificate is `ca`.
pub(crate) fn check_signed_by(leaf: &[u8], ca: &[u8]) -> Result<(), PkiError> {
    let leaf = parse_der(leaf)?;
    let ca = parse_der(ca)?;
    leaf.verify_signature(Some(ca.public_key())).map_err(|_| {
        PkiError::Certificate("the certificate was not issued by this cluster's CA".into())
    })
}

/// Checks that `crl` (DER) is a CRL signed by the CA whose certificate is `ca`.
pub(crate) fn check_crl_signed_by(crl: &[u8], ca: &[u8]) -> Result<(), PkiError> {
    let (rest, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl)
        .map_err(|e| PkiError::Certificate(format!("unreadable CRL: {e}")))?;
    if !rest.is_empty() {
        return Err(PkiError::Certificate("trailing bytes after the CRL".into()));
    }
    let ca = parse_der(ca)?;
    parsed
        .verify_signature(ca.public_key())
        .map_err(|_| PkiError::Certificate("the CRL was not issued by this cluster's CA".into()))
}

/// All PEM blocks of `text`, tagged `what` in errors.
pub(crate) fn pem_blocks(text: &str, what: &str) -> Result<Vec<pem::Pem>, PkiError> {
    pem::parse_many(text).map_err(|e| PkiError::Pem {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

/// The certificates in `text`, in order. Fails if there are none.
pub(crate) fn certs_from_pem(
    text: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = pem_blocks(text, what)?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(PkiError::Pem {
            what: what.to_string(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The one PKCS#8 `PRIVATE KEY` in `text`.
pub(crate) fn key_from_pem(text: &str, what: &str) -> Result<Vec<u8>, PkiError> {
    let mut keys = pem_blocks(text, what)?
        .into_iter()
        .filter(|p| p.tag().ends_with("PRIVATE KEY"))
        .collect::<Vec<_>>();
    match keys.len() {
        1 => {}
        0 => {
            return Err(PkiError::Pem {
                what: what.to_string(),
                reason: "no PRIVATE KEY block".into(),
            })
        }
        _ => {
            return Err(PkiError::Pem {
                what: what.to_string(),
                reason: "more than one private key".into(),
            })
        }
    }
    let key = keys.remove(0);
    if key.tag() != "PRIVATE KEY" {
        return Err(PkiError::Pem {
            what: what.to_string(),
            reason: format!("{} is not a PKCS#8 PRIVATE KEY", key.tag()),
        });
    }
    Ok(key.into_contents())
}

/// Parses a PKCS#8 key and checks it is the one `spki` (DER) names.
pub(crate) fn key_pair_matching(pkcs8: &[u8], spki: &[u8]) -> Result<rcgen::KeyPair, PkiError> {
    use rcgen::PublicKeyData;
    let kp = rcgen::KeyPair::try_from(pkcs8)
        .map_err(|e| PkiError::KeyMismatch(format!("unreadable private key: {e}")))?;
    if kp.subject_public_key_info() != spki {
        return Err(PkiError::KeyMismatch(
            "its public key differs from the certificate's".into(),
        ));
    }
    Ok(kp)
}

/// PEM with Unix line endings (the `pem` crate's default is CRLF).
pub(crate) fn encode_pem(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

pub(crate) fn cert_pem(der: &[u8]) -> String {
    encode_pem("CERTIFICATE", der)
}

pub(crate) fn key_pem(pkcs8: &[u8]) -> String {
    encode_pem("PRIVATE KEY", pkcs8)
}
