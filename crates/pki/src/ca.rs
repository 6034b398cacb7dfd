//! The cluster CA: creation, loading, issuing, backup and restore.

use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateDer;

use crate::cert::{
    self, certs_from_pem, cluster_id_of_spki, identity_uri, key_from_pem, offset_from_system,
    CaInfo, CA_ROLE,
};
use crate::fsutil::{self, CERT_MODE, KEY_MODE};
use crate::{validate_name, Identity, PkiError, Role};

/// The CA certificate's file name in the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key's file name in the CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";

/// How long a new CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates are valid from this long before they are issued, so that a
/// peer whose clock is a little behind the CA's accepts them at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

const ENCRYPTED_TAG: &str = "TANDEM ENCRYPTED CA BACKUP";
const MAGIC: &[u8; 8] = b"TNDMCA\x00\x01";
const PBKDF2_ITERATIONS: u32 = 600_000;
/// A backup asking for fewer rounds is not one of ours; more would let a
/// crafted file burn minutes of CPU.
const PBKDF2_ITERATIONS_RANGE: std::ops::RangeInclusive<u32> = 100_000..=10_000_000;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = MAGIC.len() + 4 + SALT_LEN + NONCE_LEN;
/// The shortest passphrase [`ClusterCa::backup`] accepts.
pub const MIN_PASSPHRASE_LEN: usize = 8;

/// A certificate and its new private key, as the CA hands them out.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM. Secret: write it 0600 (see [`Identity::save`]).
    pub key_pem: String,
    pub name: String,
    pub role: Role,
    /// Lowercase hex, no separators: what [`crate::Revocations`] is asked.
    pub serial: String,
    pub not_after: SystemTime,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What [`ClusterCa::backup`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub path: PathBuf,
    pub encrypted: bool,
    pub cluster_id: String,
}

impl BackupInfo {
    /// The warning to show an operator when the backup is not encrypted.
    pub fn warning(&self) -> Option<String> {
        (!self.encrypted).then(|| {
            format!(
                "WARNING: {} is NOT ENCRYPTED. It holds the cluster CA's private key in \
                 the clear: anyone who can read it can issue certificates for cluster {}. \
                 It was written 0600; keep it offline.",
                self.path.display(),
                self.cluster_id
            )
        })
    }
}

/// The cluster certificate authority. Holds the CA private key: it lives
/// where `tandem cluster init` ran (the manager's host, or an operator's
/// machine for a standalone pair), never on ordinary hosts.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    info: CaInfo,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster_id", &self.info.cluster_id)
            .field("cluster_name", &self.info.cluster_name)
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}

fn dn(common_name: &str, unit: Option<&str>, cluster_id: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, format!("tandem:{cluster_id}"));
    if let Some(unit) = unit {
        dn.push(DnType::OrganizationalUnitName, unit);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn ia5(s: String) -> Result<Ia5String, PkiError> {
    Ia5String::try_from(s).map_err(PkiError::Generate)
}

/// 16 random bytes, positive and with a non-zero first byte, so that the
/// serial is always 32 hex characters.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    fill_random(&mut bytes)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn fill_random(buf: &mut [u8]) -> Result<(), PkiError> {
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| PkiError::Generate(rcgen::Error::RingUnspecified))
}

impl ClusterCa {
    /// Makes a new cluster CA in `dir`: `ca.pem`, and `ca.key` mode 0600;
    /// `dir` is created if needed and set to 0700. Refuses if either file
    /// already exists.
    pub fn create(dir: &Path, cluster_name: &str) -> Result<ClusterCa, PkiError> {
        validate_name(cluster_name)?;
        Self::refuse_existing(dir)?;
        let key = KeyPair::generate()?;
        let cluster_id = cluster_id_of_spki(&key.subject_public_key_info());
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(
            &format!("tandem cluster CA {cluster_name}"),
            None,
            &cluster_id,
        );
        params.subject_alt_names = vec![SanType::URI(ia5(identity_uri(
            &cluster_id,
            CA_ROLE,
            cluster_name,
        ))?)];
        // Path length 0: this CA signs node certificates, never other CAs.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset_from_system(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;
        params.not_after = offset_from_system(
            now.checked_add(CA_VALIDITY)
                .ok_or_else(|| PkiError::Validity("CA expiry out of range".into()))?,
        )?;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let ca = Self::from_parts(cert.der().clone(), key)?;
        ca.persist_new(dir)?;
        Ok(ca)
    }

    /// Loads the CA from `dir`. Refuses a `ca.key` that group or others can
    /// read, a key that is not the certificate's, and a certificate that is
    /// not a tandem cluster CA.
    pub fn load(dir: &Path) -> Result<ClusterCa, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_text = fsutil::read_text(&cert_path)?;
        let key_text = fsutil::read_secret(&key_path)?;
        Self::from_pem(
            &cert_text,
            &key_text,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    fn from_pem(
        cert_text: &str,
        key_text: &str,
        cert_what: &str,
        key_what: &str,
    ) -> Result<ClusterCa, PkiError> {
        let certs = certs_from_pem(cert_text, cert_what)?;
        let [der] = <[_; 1]>::try_from(certs).map_err(|_| PkiError::Pem {
            what: cert_what.to_string(),
            reason: "expected exactly one certificate".into(),
        })?;
        let key_der = key_from_pem(key_text, key_what)?;
        let key = KeyPair::try_from(key_der.as_slice())
            .map_err(|e| PkiError::KeyMismatch(format!("{key_what}: unreadable key: {e}")))?;
        Self::from_parts(der, key)
    }

    fn from_parts(der: CertificateDer<'static>, key: KeyPair) -> Result<ClusterCa, PkiError> {
        let info = cert::parse_ca(&der)?;
        if key.subject_public_key_info() != info.spki {
            return Err(PkiError::KeyMismatch(
                "the CA key's public key differs from the CA certificate's".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)?;
        Ok(ClusterCa {
            cert_pem: cert::cert_pem(&der),
            issuer,
            cert_der: der,
            info,
        })
    }

    fn refuse_existing(dir: &Path) -> Result<(), PkiError> {
        for f in [CA_CERT_FILE, CA_KEY_FILE] {
            let p = dir.join(f);
            if p.symlink_metadata().is_ok() {
                return Err(PkiError::AlreadyExists(p));
            }
        }
        Ok(())
    }

    /// Writes `ca.key` then `ca.pem` into `dir`, never over existing files.
    fn persist_new(&self, dir: &Path) -> Result<(), PkiError> {
        Self::refuse_existing(dir)?;
        fsutil::private_dir(dir)?;
        fsutil::write_new(
            &dir.join(CA_KEY_FILE),
            self.issuer.key().serialize_pem().as_bytes(),
            KEY_MODE,
        )?;
        fsutil::write_new(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), CERT_MODE)
    }

    /// The cluster id: the first 128 bits of SHA-256 of the CA's public key
    /// (SubjectPublicKeyInfo), 32 lowercase hex characters. Stable across
    /// backup and restore; in every certificate's `tandem://` URI.
    pub fn cluster_id(&self) -> &str {
        &self.info.cluster_id
    }

    /// The human name given to `create`.
    pub fn cluster_name(&self) -> &str {
        &self.info.cluster_name
    }

    /// The CA certificate, PEM: what every node trusts.
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// When the CA certificate expires. No certificate is issued past it.
    pub fn not_after(&self) -> SystemTime {
        self.info.not_after
    }

    /// Issues a certificate for `name` in `role`, valid from a few minutes
    /// ago ([`CLOCK_SKEW`]) for `validity`, with a new P-256 key.
    pub fn issue(
        &self,
        name: &str,
        role: Role,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        if validity.is_zero() {
            return Err(PkiError::Validity("validity is zero".into()));
        }
        let now = SystemTime::now();
        let not_after = now
            .checked_add(validity)
            .ok_or_else(|| PkiError::Validity("validity out of range".into()))?;
        self.issue_between(
            name,
            role,
            now.checked_sub(CLOCK_SKEW).unwrap_or(now),
            not_after,
        )
    }

    /// Issues a certificate valid exactly from `not_before` to `not_after`
    /// (whole seconds). Also makes already-expired or not-yet-valid
    /// certificates, which tests need.
    pub fn issue_between(
        &self,
        name: &str,
        role: Role,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, PkiError> {
        validate_name(name)?;
        if not_after <= not_before {
            return Err(PkiError::Validity(
                "not_after is not after not_before".into(),
            ));
        }
        if not_after > self.info.not_after {
            return Err(PkiError::Validity(
                "the certificate would outlive the cluster CA; renew the CA first".into(),
            ));
        }
        let key = KeyPair::generate()?;
        let cluster_id = &self.info.cluster_id;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name, Some(role.as_str()), cluster_id);
        params.subject_alt_names = vec![
            SanType::DnsName(ia5(name.to_string())?),
            SanType::URI(ia5(identity_uri(cluster_id, role.as_str(), name))?),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        // keyEncipherment is meaningless for EC keys, but GnuTLS (QEMU's
        // tls-creds-x509) requires it when keyUsage is critical, as rcgen
        // writes it.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if role.can_serve() {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset_from_system(not_before)?;
        params.not_after = offset_from_system(not_after)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &self.issuer)?;
        // Read back what was written, so the caller sees exactly what a
        // peer will (whole seconds, normalised serial).
        let info = cert::parse_leaf(cert.der())?;
        Ok(IssuedCert {
            cert_pem: cert::cert_pem(cert.der()),
            key_pem: key.serialize_pem(),
            name: info.name,
            role: info.role,
            serial: info.serial,
            not_after: info.not_after,
        })
    }

    /// A new certificate (new key, new serial) for the holder of `current`:
    /// same name and role. The old one stays valid until it expires or is
    /// revoked.
    pub fn renew(&self, current: &Identity, validity: Duration) -> Result<IssuedCert, PkiError> {
        if current.cluster_id() != self.cluster_id() {
            return Err(PkiError::WrongCluster {
                expected: self.cluster_id().to_string(),
                found: current.cluster_id().to_string(),
            });
        }
        self.issue(current.name(), current.role(), validity)
    }

    /// What the holder of `issued` keeps: its certificate and key, and this CA's certificate.
    pub fn identity(&self, issued: &IssuedCert) -> Result<Identity, PkiError> {
        Identity::from_issued(&self.cert_pem, issued)
    }

    /// Writes the files QEMU's `-object tls-creds-x509,dir=OUT` reads, for
    /// the node `node`. See [`Identity::qemu_tls_dir`].
    pub fn qemu_tls_dir(&self, out: &Path, node: &IssuedCert) -> Result<(), PkiError> {
        self.identity(node)?.qemu_tls_dir(out)
    }

    /// A CRL (PEM, `X509 CRL`) signed by this CA naming `serials` (as
    /// [`crate::RevocationList::serials`] gives them), with CRL number
    /// `number` (use the list's generation). For QEMU, which reads it as
    /// `ca-crl.pem` ([`Identity::qemu_crl`]); tandem's own TLS asks
    /// [`crate::Revocations`] instead. Its nextUpdate is the CA's expiry:
    /// an out-of-date CRL can make GnuTLS flag every peer, and a host cut
    /// off from the manager should keep its last list, not risk QEMU TLS.
    pub fn crl_pem(&self, number: u64, serials: &[String]) -> Result<String, PkiError> {
        let now = SystemTime::now();
        let this_update = offset_from_system(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;
        let mut revoked_certs = Vec::with_capacity(serials.len());
        for s in serials {
            let bytes = crate::revocation::normalize_serial(s)
                .and_then(|hex| hex_bytes(&hex))
                .ok_or_else(|| PkiError::InvalidSerial(crate::truncate_for_message(s)))?;
            revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: this_update,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update,
            next_update: offset_from_system(self.info.not_after)?,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        Ok(cert::encode_pem("X509 CRL", crl.der()))
    }

    /// Writes the CA (certificate and key) to the single file `to`, mode
    /// 0600, never over an existing file. With a passphrase the key is
    /// encrypted (PBKDF2-HMAC-SHA256, 600 000 rounds, then AES-256-GCM);
    /// without one the file says in its first lines that it is not
    /// encrypted, a warning is logged, and [`BackupInfo::warning`] has the
    /// text for the operator.
    pub fn backup(&self, to: &Path, passphrase: Option<&str>) -> Result<BackupInfo, PkiError> {
        let key_pem = self.issuer.key().serialize_pem();
        let header = format!(
            "# tandem cluster CA backup\n# cluster: {} (id {})\n",
            self.info.cluster_name, self.info.cluster_id
        );
        let (text, encrypted) = match passphrase {
            Some(pass) => {
                if pass.chars().count() < MIN_PASSPHRASE_LEN {
                    return Err(PkiError::Backup {
                        path: to.to_path_buf(),
                        reason: format!(
                            "the passphrase is shorter than {MIN_PASSPHRASE_LEN} characters"
                        ),
                    });
                }
                let plain = format!("{}{}", self.cert_pem, key_pem);
                let blob = seal(pass.as_bytes(), plain.as_bytes(), PBKDF2_ITERATIONS)?;
                (
                    format!(
                        "{header}# encrypted: PBKDF2-HMAC-SHA256 ({PBKDF2_ITERATIONS} rounds), AES-256-GCM\n{}",
                        cert::encode_pem(ENCRYPTED_TAG, &blob)
                    ),
                    true,
                )
            }
            None => (
                format!(
                    "{header}#\n\
                     # !!! NOT ENCRYPTED !!!\n\
                     # This file holds the cluster CA's private key in the clear. Anyone\n\
                     # who can read it can issue certificates for this cluster.\n\
                     # Keep it offline and mode 0600.\n\
                     {}{}",
                    self.cert_pem, key_pem
                ),
                false,
            ),
        };
        fsutil::write_new(to, text.as_bytes(), KEY_MODE)?;
        let info = BackupInfo {
            path: to.to_path_buf(),
            encrypted,
            cluster_id: self.info.cluster_id.clone(),
        };
        if let Some(w) = info.warning() {
            tracing::warn!("{w}");
        }
        Ok(info)
    }

    /// Restores a backup made by [`backup`](Self::backup) into `dir`, as
    /// [`create`](Self::create) would have left it. Refuses to overwrite an
    /// existing CA. An encrypted backup needs its passphrase.
    pub fn restore(
        from: &Path,
        dir: &Path,
        passphrase: Option<&str>,
    ) -> Result<ClusterCa, PkiError> {
        let text = fsutil::read_text(from)?;
        let what = from.display().to_string();
        let blocks = cert::pem_blocks(&text, &what)?;
        let ca = match blocks.iter().find(|b| b.tag() == ENCRYPTED_TAG) {
            Some(block) => {
                let pass =
                    passphrase.ok_or_else(|| PkiError::PassphraseRequired(from.to_path_buf()))?;
                let plain = open(pass.as_bytes(), block.contents(), from)?;
                let plain = String::from_utf8(plain).map_err(|_| PkiError::Backup {
                    path: from.to_path_buf(),
                    reason: "decrypted content is not text".into(),
                })?;
                Self::from_pem(&plain, &plain, &what, &what)?
            }
            None => Self::from_pem(&text, &text, &what, &what)?,
        };
        ca.persist_new(dir)?;
        Ok(ca)
    }
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

fn pbkdf2_key(pass: &[u8], salt: &[u8], iterations: u32) -> Result<[u8; 32], ()> {
    let rounds = NonZeroU32::new(iterations).ok_or(())?;
    let mut key = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        salt,
        pass,
        &mut key,
    );
    Ok(key)
}

/// `MAGIC | iterations (u32 BE) | salt | nonce | AES-256-GCM(plain) | tag`,
/// the header being the AEAD's associated data.
fn seal(pass: &[u8], plain: &[u8], iterations: u32) -> Result<Vec<u8>, PkiError> {
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut salt)?;
    fill_random(&mut nonce)?;
    let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&iterations.to_be_bytes());
    out.extend_from_slice(&salt);
    out.extend_from_slice(&nonce);
    let crypto_err = || PkiError::Generate(rcgen::Error::RingUnspecified);
    let key = pbkdf2_key(pass, &salt, iterations).map_err(|_| crypto_err())?;
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).map_err(|_| crypto_err())?,
    );
    let mut buf = plain.to_vec();
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key(nonce),
        ring::aead::Aad::from(out.as_slice()),
        &mut buf,
    )
    .map_err(|_| crypto_err())?;
    out.extend_from_slice(&buf);
    Ok(out)
}

fn open(pass: &[u8], blob: &[u8], path: &Path) -> Result<Vec<u8>, PkiError> {
    let damaged = |reason: &str| PkiError::Backup {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let (header, sealed) = blob
        .split_at_checked(HEADER_LEN)
        .ok_or_else(|| damaged("too short"))?;
    let (magic, rest) = header
        .split_first_chunk::<8>()
        .ok_or_else(|| damaged("too short"))?;
    if magic != MAGIC {
        return Err(damaged("not a tandem CA backup (bad magic)"));
    }
    let (iterations, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| damaged("too short"))?;
    let iterations = u32::from_be_bytes(*iterations);
    if !PBKDF2_ITERATIONS_RANGE.contains(&iterations) {
        return Err(damaged("implausible key-derivation round count"));
    }
    let (salt, nonce) = rest
        .split_first_chunk::<SALT_LEN>()
        .ok_or_else(|| damaged("too short"))?;
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| damaged("too short"))?;
    let key = pbkdf2_key(pass, salt, iterations).map_err(|_| damaged("bad round count"))?;
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key)
            .map_err(|_| damaged("key setup"))?,
    );
    let mut buf = sealed.to_vec();
    let plain = key
        .open_in_place(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(header),
            &mut buf,
        )
        .map_err(|_| PkiError::BadPassphrase(path.to_path_buf()))?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let p = Path::new("x");
        let blob = seal(b"correct horse", b"secret", 100_000).unwrap();
        assert_eq!(open(b"correct horse", &blob, p).unwrap(), b"secret");
        assert!(matches!(
            open(b"wrong horse", &blob, p),
            Err(PkiError::BadPassphrase(_))
        ));
        // Every header byte (each one is authenticated or checked), and a
        // few of the ciphertext and tag. Each try runs the key derivation.
        let positions = (0..HEADER_LEN).chain([HEADER_LEN, HEADER_LEN + 3, blob.len() - 1]);
        for i in positions {
            let mut t = blob.clone();
            t[i] ^= 1;
            assert!(
                open(b"correct horse", &t, p).is_err(),
                "flip at {i} accepted"
            );
        }
        for n in [0, 7, HEADER_LEN - 1, HEADER_LEN, blob.len() - 1] {
            assert!(open(b"correct horse", &blob[..n], p).is_err());
        }
    }

    #[test]
    fn serials_are_32_hex() {
        for _ in 0..100 {
            let s = random_serial().unwrap();
            assert_eq!(cert::serial_hex(&s.to_bytes()).len(), 32);
        }
    }
}
