//! rustls configurations that admit only this cluster's certificates, and
//! reading the authenticated peer back after the handshake.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::cert::{self, LeafInfo};
use crate::{validate_name, Identity, PkiError, Revocations, Role};

/// A peer authenticated by a handshake with [`server_config`] or
/// [`client_config`]: who it is according to its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub role: Role,
    pub cluster_id: String,
    pub serial: String,
    pub not_after: SystemTime,
}

impl Peer {
    /// `Ok` if the peer has one of `roles`, else [`PkiError::WrongRole`]:
    /// how a listener that accepts several roles enforces per-call rules
    /// (a host certificate cannot perform operator actions).
    pub fn require_role(&self, roles: &[Role]) -> Result<(), PkiError> {
        if roles.contains(&self.role) {
            return Ok(());
        }
        Err(PkiError::WrongRole {
            name: self.name.clone(),
            role: self.role,
            expected: roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(" or "),
        })
    }
}

impl From<LeafInfo> for Peer {
    fn from(l: LeafInfo) -> Self {
        Peer {
            name: l.name,
            role: l.role,
            cluster_id: l.cluster_id,
            serial: l.serial,
            not_after: l.not_after,
        }
    }
}

/// rustls with *ring*, as the project chose (no OpenSSL, no aws-lc). Since
/// 0.23.48 rustls marks ring's provider deprecated because ring has no
/// post-quantum key exchange (ML-KEM); switching providers is this one
/// function, and both ends of every link are ours.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(id: &Identity) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(id.ca_der().clone())?;
    Ok(Arc::new(roots))
}

fn reject(e: PkiError) -> rustls::Error {
    match e {
        PkiError::Revoked(_) => rustls::Error::InvalidCertificate(CertificateError::Revoked),
        other => {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(other))))
        }
    }
}

/// The checks after webpki's (chain to the CA, validity period, key usage):
/// a tandem identity of this cluster, not revoked, in an admitted role.
fn check_peer(
    end_entity: &CertificateDer<'_>,
    cluster_id: &str,
    revoked: &dyn Revocations,
    roles: Option<&[Role]>,
) -> Result<(), rustls::Error> {
    let info = cert::parse_leaf(end_entity).map_err(reject)?;
    if info.cluster_id != cluster_id {
        return Err(reject(PkiError::WrongCluster {
            expected: cluster_id.to_string(),
            found: info.cluster_id,
        }));
    }
    if revoked.is_revoked(&info.serial) {
        return Err(reject(PkiError::Revoked(info.serial)));
    }
    if let Some(roles) = roles {
        Peer::from(info).require_role(roles).map_err(reject)?;
    }
    Ok(())
}

struct ClusterClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster_id: String,
    revoked: Arc<dyn Revocations>,
    roles: Option<Vec<Role>>,
}

impl fmt::Debug for ClusterClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterClientVerifier")
            .field("cluster_id", &self.cluster_id)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer(
            end_entity,
            &self.cluster_id,
            self.revoked.as_ref(),
            self.roles.as_deref(),
        )?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

struct ClusterServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    cluster_id: String,
    revoked: Arc<dyn Revocations>,
}

impl fmt::Debug for ClusterServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterServerVerifier")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_peer(
            end_entity,
            &self.cluster_id,
            self.revoked.as_ref(),
            Some(&[Role::Host, Role::Manager]),
        )?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// A TLS server configuration for a listener between tandem processes: it
/// requires a client certificate that chains to the cluster CA, is within
/// its validity period, carries this cluster's id and is not revoked.
/// Any role is admitted; check [`Peer::role`] per request, or use
/// [`server_config_for_roles`]. TLS 1.3 only, no session resumption (every
/// connection is fully checked). Clone the config to set ALPN.
pub fn server_config(
    id: &Identity,
    revoked: Arc<dyn Revocations>,
) -> Result<Arc<ServerConfig>, PkiError> {
    build_server_config(id, revoked, None)
}

/// As [`server_config`], and the handshake also fails for a client whose
/// role is not in `roles` (the replication listener admits only hosts).
pub fn server_config_for_roles(
    id: &Identity,
    revoked: Arc<dyn Revocations>,
    roles: &[Role],
) -> Result<Arc<ServerConfig>, PkiError> {
    build_server_config(id, revoked, Some(roles.to_vec()))
}

fn build_server_config(
    id: &Identity,
    revoked: Arc<dyn Revocations>,
    roles: Option<Vec<Role>>,
) -> Result<Arc<ServerConfig>, PkiError> {
    if !id.role().can_serve() {
        return Err(PkiError::WrongRole {
            name: id.name().to_string(),
            role: id.role(),
            expected: "host or manager (operators do not serve)".into(),
        });
    }
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots(id)?, provider.clone())
        .build()
        .map_err(|e| PkiError::Certificate(format!("client verifier: {e}")))?;
    let verifier = Arc::new(ClusterClientVerifier {
        inner,
        cluster_id: id.cluster_id().to_string(),
        revoked,
        roles,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.cert_chain().to_vec(), id.private_key())?;
    // A resumed session skips the certificate checks, revocation included.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A TLS client configuration: presents `id`'s certificate, and accepts a
/// server only if its certificate chains to the cluster CA, is valid now,
/// is a host or manager certificate of this cluster, is not revoked, and
/// has the name dialled (see [`server_name`]). TLS 1.3 only, no resumption.
///
/// In TLS 1.3 the client finishes its side of the handshake before the
/// server has checked the client's certificate: a client the server
/// rejects sees the rejection as an error on its first read.
pub fn client_config(
    id: &Identity,
    revoked: Arc<dyn Revocations>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(roots(id)?, provider.clone())
        .build()
        .map_err(|e| PkiError::Certificate(format!("server verifier: {e}")))?;
    let verifier = Arc::new(ClusterServerVerifier {
        inner,
        cluster_id: id.cluster_id().to_string(),
        revoked,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(id.cert_chain().to_vec(), id.private_key())?;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The TLS server name to dial a peer by: its certificate name (a DNS SAN
/// in every certificate), whatever address the connection goes to.
pub fn server_name(peer_name: &str) -> Result<ServerName<'static>, PkiError> {
    validate_name(peer_name)?;
    ServerName::try_from(peer_name.to_string()).map_err(|_| PkiError::InvalidName {
        name: peer_name.to_string(),
        reason: "not a DNS name",
    })
}

/// The authenticated peer of a connection made with [`server_config`] or
/// [`client_config`], after its handshake: name, role and cluster from its
/// certificate's `tandem://` URI. With a configuration that did not verify
/// the peer this only reads what the peer claims.
pub fn peer_of(conn: &CommonState) -> Result<Peer, PkiError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(PkiError::NoPeerCertificate)?;
    cert::parse_leaf(leaf).map(Peer::from)
}

fn handshake_error(e: std::io::Error) -> PkiError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => PkiError::Tls(tls.clone()),
        None => PkiError::Handshake(e),
    }
}

/// Runs the server side of a handshake on `io` and returns the stream with
/// the authenticated peer.
pub async fn accept<IO>(
    config: Arc<ServerConfig>,
    io: IO,
) -> Result<(tokio_rustls::server::TlsStream<IO>, Peer), PkiError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let stream = tokio_rustls::TlsAcceptor::from(config)
        .accept(io)
        .await
        .map_err(handshake_error)?;
    let peer = peer_of(stream.get_ref().1)?;
    Ok((stream, peer))
}

/// Runs the client side of a handshake on `io` with the peer named
/// `peer_name` and returns the stream with the authenticated peer (whose
/// name is `peer_name`: the handshake checked it).
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    peer_name: &str,
    io: IO,
) -> Result<(tokio_rustls::client::TlsStream<IO>, Peer), PkiError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = server_name(peer_name)?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(handshake_error)?;
    let peer = peer_of(stream.get_ref().1)?;
    Ok((stream, peer))
}
