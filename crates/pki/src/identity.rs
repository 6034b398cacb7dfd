//! What a node holds: its certificate (chain), its key and the CA certificate.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cert::{self, CaInfo, LeafInfo};
use crate::fsutil::{self, CERT_MODE, KEY_MODE};
use crate::{IssuedCert, Peer, PkiError, Role};

/// The file [`Identity::save`] writes and [`Identity::load`] reads in a
/// node's identity directory: certificate chain, CA certificate and private
/// key in one file (mode 0600), so that a renewal replaces all three in one
/// atomic rename and a crash never leaves a key beside the wrong certificate.
pub const IDENTITY_FILE: &str = "identity.pem";

/// The files of a QEMU `tls-creds-x509` directory.
pub const QEMU_CA_CERT: &str = "ca-cert.pem";
pub const QEMU_SERVER_CERT: &str = "server-cert.pem";
pub const QEMU_SERVER_KEY: &str = "server-key.pem";
pub const QEMU_CLIENT_CERT: &str = "client-cert.pem";
pub const QEMU_CLIENT_KEY: &str = "client-key.pem";
pub const QEMU_CA_CRL: &str = "ca-crl.pem";

/// A node's credentials: checked on construction (the key is the
/// certificate's, the certificate was issued by the CA, both name the same
/// cluster), but not for expiry, so that an expired identity still loads
/// and can be reported.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    ca: CertificateDer<'static>,
    leaf: LeafInfo,
    ca_info: CaInfo,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
            leaf: self.leaf.clone(),
            ca_info: self.ca_info.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.leaf.name)
            .field("role", &self.leaf.role)
            .field("cluster_id", &self.leaf.cluster_id)
            .field("serial", &self.leaf.serial)
            .field("not_after", &self.leaf.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// From PEM text: `cert_chain_pem` holds the node certificate first
    /// (then any intermediates), `key_pem` its PKCS#8 key, `ca_pem` the
    /// cluster CA certificate.
    pub fn from_pem(cert_chain_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, PkiError> {
        let chain = cert::certs_from_pem(cert_chain_pem, "certificate")?;
        let cas = cert::certs_from_pem(ca_pem, "CA certificate")?;
        let [ca] = <[_; 1]>::try_from(cas).map_err(|_| PkiError::Pem {
            what: "CA certificate".into(),
            reason: "expected exactly one certificate".into(),
        })?;
        let key = cert::key_from_pem(key_pem, "private key")?;
        Self::from_parts(chain, key, ca)
    }

    /// What a node gets from [`crate::ClusterCa::issue`].
    pub fn from_issued(ca_pem: &str, issued: &IssuedCert) -> Result<Self, PkiError> {
        Self::from_pem(&issued.cert_pem, &issued.key_pem, ca_pem)
    }

    fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: Vec<u8>,
        ca: CertificateDer<'static>,
    ) -> Result<Self, PkiError> {
        let leaf_der = chain
            .first()
            .ok_or_else(|| PkiError::Certificate("empty certificate chain".into()))?;
        let leaf = cert::parse_leaf(leaf_der)?;
        let ca_info = cert::parse_ca(&ca)?;
        if leaf.cluster_id != ca_info.cluster_id {
            return Err(PkiError::WrongCluster {
                expected: ca_info.cluster_id,
                found: leaf.cluster_id,
            });
        }
        // The CA has path length 0: it signs node certificates directly.
        cert::check_signed_by(leaf_der, &ca)?;
        cert::key_pair_matching(&key, &leaf.spki)?;
        Ok(Identity {
            chain,
            key: PrivatePkcs8KeyDer::from(key),
            ca,
            leaf,
            ca_info,
        })
    }

    /// Loads `dir/identity.pem`, refusing it if group or others can read it.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let path = dir.join(IDENTITY_FILE);
        let text = fsutil::read_secret(&path)?;
        let what = path.display().to_string();
        let mut certs = cert::certs_from_pem(&text, &what)?;
        let ca = certs.pop();
        let (Some(ca), false) = (ca, certs.is_empty()) else {
            return Err(PkiError::Pem {
                what,
                reason: "expected the node certificate, then the CA certificate".into(),
            });
        };
        let key = cert::key_from_pem(&text, &what)?;
        Self::from_parts(certs, key, ca)
    }

    /// Writes `dir/identity.pem` (0600) atomically, creating `dir` (0700)
    /// if needed. Replaces an earlier identity: this is how a renewal lands.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        fsutil::private_dir(dir)?;
        let text = format!(
            "# tandem identity: {} {} of cluster {} ({}), serial {}\n\
             # node certificate\n{}\
             # cluster CA certificate\n{}\
             # private key\n{}",
            self.leaf.role,
            self.leaf.name,
            self.ca_info.cluster_name,
            self.leaf.cluster_id,
            self.leaf.serial,
            self.cert_pem(),
            self.ca_pem(),
            self.key_pem(),
        );
        fsutil::replace(&dir.join(IDENTITY_FILE), text.as_bytes(), KEY_MODE)
    }

    pub fn name(&self) -> &str {
        &self.leaf.name
    }

    pub fn role(&self) -> Role {
        self.leaf.role
    }

    pub fn cluster_id(&self) -> &str {
        &self.leaf.cluster_id
    }

    /// The cluster's human name, from the CA certificate.
    pub fn cluster_name(&self) -> &str {
        &self.ca_info.cluster_name
    }

    pub fn serial(&self) -> &str {
        &self.leaf.serial
    }

    pub fn not_before(&self) -> SystemTime {
        self.leaf.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.leaf.not_after
    }

    /// Whether the certificate expires within `window` from now (or has
    /// expired): `ft status` warns with a 30-day window.
    pub fn expires_within(&self, window: Duration) -> bool {
        match SystemTime::now().checked_add(window) {
            Some(t) => t >= self.leaf.not_after,
            None => true,
        }
    }

    /// This identity as its peers see it.
    pub fn as_peer(&self) -> Peer {
        Peer {
            name: self.leaf.name.clone(),
            role: self.leaf.role,
            cluster_id: self.leaf.cluster_id.clone(),
            serial: self.leaf.serial.clone(),
            not_after: self.leaf.not_after,
        }
    }

    /// The certificate chain, node certificate first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key, for a rustls config.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The cluster CA certificate.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// The certificate chain, PEM, node certificate first.
    pub fn cert_pem(&self) -> String {
        self.chain.iter().map(|c| cert::cert_pem(c)).collect()
    }

    /// The cluster CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        cert::cert_pem(&self.ca)
    }

    /// The private key, PKCS#8 PEM. Secret.
    pub fn key_pem(&self) -> String {
        cert::key_pem(self.key.secret_pkcs8_der())
    }

    /// Writes the directory QEMU's `-object tls-creds-x509,id=..,dir=OUT,
    /// endpoint=server|client,verify-peer=on` reads: `ca-cert.pem`,
    /// `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
    /// `client-key.pem` (this node's certificate serves both ends). Keys are
    /// 0600, certificates 0644, `out` 0700; each file is replaced
    /// atomically, so rewriting after a renewal is safe. The certificate's
    /// DNS name is the node name: give it to QEMU as `tls-hostname`.
    pub fn qemu_tls_dir(&self, out: &Path) -> Result<(), PkiError> {
        if !self.leaf.role.can_serve() {
            return Err(PkiError::WrongRole {
                name: self.leaf.name.clone(),
                role: self.leaf.role,
                expected: "host or manager (QEMU credentials serve both ends)".into(),
            });
        }
        fsutil::private_dir(out)?;
        let cert = self.cert_pem();
        let key = self.key_pem();
        fsutil::replace(&out.join(QEMU_CA_CERT), self.ca_pem().as_bytes(), CERT_MODE)?;
        fsutil::replace(&out.join(QEMU_SERVER_KEY), key.as_bytes(), KEY_MODE)?;
        fsutil::replace(&out.join(QEMU_SERVER_CERT), cert.as_bytes(), CERT_MODE)?;
        fsutil::replace(&out.join(QEMU_CLIENT_KEY), key.as_bytes(), KEY_MODE)?;
        fsutil::replace(&out.join(QEMU_CLIENT_CERT), cert.as_bytes(), CERT_MODE)
    }

    /// Writes (replaces) `ca-crl.pem` in the QEMU directory `out`: a CRL
    /// from [`crate::ClusterCa::crl_pem`], checked to be signed by this
    /// identity's CA. QEMU reads it when a `tls-creds-x509` object is
    /// created and then refuses the certificates it lists.
    pub fn qemu_crl(&self, out: &Path, crl_pem: &str) -> Result<(), PkiError> {
        let blocks = cert::pem_blocks(crl_pem, "CRL")?;
        let [block] = <[_; 1]>::try_from(blocks).map_err(|_| PkiError::Pem {
            what: "CRL".into(),
            reason: "expected exactly one PEM block".into(),
        })?;
        if block.tag() != "X509 CRL" {
            return Err(PkiError::Pem {
                what: "CRL".into(),
                reason: format!("{} is not an X509 CRL", block.tag()),
            });
        }
        cert::check_crl_signed_by(block.contents(), &self.ca)?;
        fsutil::private_dir(out)?;
        fsutil::replace(
            &out.join(QEMU_CA_CRL),
            cert::encode_pem("X509 CRL", block.contents()).as_bytes(),
            CERT_MODE,
        )
    }
}
