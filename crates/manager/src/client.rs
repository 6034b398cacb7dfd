//! Talking to the manager: [`ManagerClient`] over mutual TLS (hosts and
//! operators), and [`join`], which a host runs once, before it has a
//! certificate, pinning the cluster CA by the hash in its token. The same
//! client type ([`ClusterClient`]) is how the manager talks to a host's API
//! ([`ClusterClient::to_host`]): only the expected server role differs.
//!
//! Each request uses a fresh connection (a full handshake, so a revoked
//! certificate on either side is noticed at once); requests are few
//! (a heartbeat every few seconds per host), so that costs little.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tandem_pki::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tandem_pki::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tandem_pki::rustls::server::ParsedCertificate;
use tandem_pki::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tandem_pki::{client_config, connect, peer_of, Identity, Peer, PkiError, Revocations, Role};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::api::{Credentials, ErrorBody, ErrorKind, JoinRequest, JOIN_ALPN};
use crate::model::token::{cert_sha256, hex};
use crate::model::JoinToken;

/// Where the manager is and what its certificate is called. Kept beside a
/// host's or operator's identity as `manager.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerEndpoint {
    /// `HOST:PORT`.
    pub address: String,
    /// The manager's certificate name: TLS checks it.
    pub name: String,
    /// The cluster's id.
    #[serde(default)]
    pub cluster_id: String,
}

/// The largest answer the client reads.
const MAX_RESPONSE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing was sent: the TCP connection failed.
    #[error("cannot reach {server} at {address}: {detail}")]
    Connect {
        address: String,
        detail: String,
        /// `the manager`, `host host-a`.
        server: String,
    },
    /// The TLS handshake failed or was refused: a certificate one side
    /// does not accept (no certificate, another cluster's, expired,
    /// revoked, a CA that is not the pinned one).
    #[error("TLS with {server} at {address} failed: {detail}")]
    Tls {
        address: String,
        detail: String,
        server: String,
    },
    #[error("{server} at {address} did not answer {what} within {after:?}")]
    Timeout {
        address: String,
        what: String,
        after: Duration,
        server: String,
    },
    #[error("HTTP with {server}: {detail}")]
    Http { detail: String, server: String },
    #[error("the answer of {server} to {what} is not valid: {detail}")]
    Decode {
        what: String,
        detail: String,
        server: String,
    },
    /// The server answered with an error.
    #[error("{message}")]
    Server {
        status: u16,
        kind: String,
        message: String,
        /// An invalid document's problems, by field path.
        fields: Vec<crate::api::FieldProblem>,
    },
    #[error("{0}")]
    Local(String),
}

impl ClientError {
    /// The manager's error kind, if it answered with an error.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Server { kind, .. } => ErrorKind::parse(kind),
            _ => None,
        }
    }

    /// The server's error kind as it said it (also kinds this crate does
    /// not know, such as a host's `unknown-txid`).
    pub fn kind_str(&self) -> Option<&str> {
        match self {
            ClientError::Server { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// Whether the request was refused at the TLS layer.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientError::Tls { .. })
    }
}

impl From<PkiError> for ClientError {
    fn from(e: PkiError) -> Self {
        ClientError::Local(e.to_string())
    }
}

/// Finds a rustls error in an error's source chain.
fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(t.to_string());
            }
        }
        cur = err.source();
    }
    None
}

/// A mutual-TLS client of a cluster peer's HTTP API: one request per
/// fresh connection, the server checked by name, cluster, revocation and
/// role.
#[derive(Clone)]
pub struct ClusterClient {
    /// Where the server is and its certificate name (`cluster_id` may be
    /// empty: the TLS configuration checks the cluster).
    endpoint: ManagerEndpoint,
    /// The role the server's certificate must have.
    role: Role,
    config: Arc<ClientConfig>,
    timeout: Duration,
}

/// The client of the manager's API, as a host or an operator.
pub type ManagerClient = ClusterClient;

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient")
            .field("endpoint", &self.endpoint)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl ClusterClient {
    /// Presents `identity`; accepts the server only if it is the manager
    /// named in `endpoint`, of the same cluster, and not in `revocations`.
    pub fn new(
        endpoint: ManagerEndpoint,
        identity: &Identity,
        revocations: Arc<dyn Revocations>,
    ) -> Result<Self, PkiError> {
        Ok(ClusterClient {
            endpoint,
            role: Role::Manager,
            config: client_config(identity, revocations)?,
            timeout: Duration::from_secs(30),
        })
    }

    /// A client of host `name`'s API at `address` (`HOST:PORT`), with a
    /// configuration from `tandem_pki::client_config` (built once and
    /// shared by every host's client). The server must present host
    /// `name`'s certificate.
    pub fn to_host(address: &str, name: &str, config: Arc<ClientConfig>) -> Self {
        ClusterClient {
            endpoint: ManagerEndpoint {
                address: address.to_string(),
                name: name.to_string(),
                cluster_id: String::new(),
            },
            role: Role::Host,
            config,
            timeout: Duration::from_secs(30),
        }
    }

    /// How errors name the server: `the manager`, `host host-a`.
    fn server(&self) -> String {
        describe_server(self.role, &self.endpoint.name)
    }

    /// Bounds each whole request (connect, handshake, answer).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn endpoint(&self) -> &ManagerEndpoint {
        &self.endpoint
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.request(Method::PUT, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::DELETE, path, None::<&()>).await
    }

    async fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let what = format!("{method} {path}");
        let address = self.endpoint.address.clone();
        let server = self.server();
        let run = async {
            let tcp = tcp_connect(&address, &server).await?;
            let (tls, peer) = connect(Arc::clone(&self.config), &self.endpoint.name, tcp)
                .await
                .map_err(|e| ClientError::Tls {
                    address: address.clone(),
                    detail: e.to_string(),
                    server: server.clone(),
                })?;
            check_role(&peer, self.role, &address, &server)?;
            let to = Server {
                address: &address,
                host_header: &self.endpoint.name,
                label: &server,
            };
            exchange(tls, &to, method, path, body).await
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                address: address.clone(),
                what,
                after: self.timeout,
                server: server.clone(),
            }),
        }
    }
}

fn describe_server(role: Role, name: &str) -> String {
    match role {
        Role::Manager => "the manager".to_string(),
        other => format!("{other} {name}"),
    }
}

fn check_role(peer: &Peer, want: Role, address: &str, server: &str) -> Result<(), ClientError> {
    if peer.role != want {
        return Err(ClientError::Tls {
            address: address.to_string(),
            detail: format!(
                "the server is {} with a {} certificate, not {server}",
                peer.name, peer.role
            ),
            server: server.to_string(),
        });
    }
    Ok(())
}

async fn tcp_connect(address: &str, server: &str) -> Result<TcpStream, ClientError> {
    let tcp = TcpStream::connect(address)
        .await
        .map_err(|e| ClientError::Connect {
            address: address.to_string(),
            detail: e.to_string(),
            server: server.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Whom a request goes to, for the Host header and for errors.
struct Server<'a> {
    address: &'a str,
    host_header: &'a str,
    label: &'a str,
}

/// One HTTP/1.1 request on an established TLS stream.
async fn exchange<IO, B, T>(
    io: IO,
    to: &Server<'_>,
    method: Method,
    path: &str,
    body: Option<&B>,
) -> Result<T, ClientError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Serialize,
    T: DeserializeOwned,
{
    let address = to.address;
    let server = || to.label.to_string();
    let http_err = |e: hyper::Error| match tls_cause(&e) {
        Some(detail) => ClientError::Tls {
            address: address.to_string(),
            detail,
            server: server(),
        },
        None => ClientError::Http {
            detail: e.to_string(),
            server: server(),
        },
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http_err)?;
    let conn_task = tokio::spawn(conn);
    let bytes = match body {
        Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Local(e.to_string()))?,
        None => Vec::new(),
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", to.host_header)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| ClientError::Http {
            detail: e.to_string(),
            server: server(),
        })?;
    let resp = sender.send_request(req).await.map_err(http_err)?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| match tls_cause(e.as_ref()) {
            Some(detail) => ClientError::Tls {
                address: address.to_string(),
                detail,
                server: server(),
            },
            None => ClientError::Http {
                detail: e.to_string(),
                server: server(),
            },
        })?
        .to_bytes();
    conn_task.abort();
    if status.is_success() {
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            what: path.to_string(),
            detail: e.to_string(),
            server: server(),
        })
    } else {
        let (kind, message, fields) = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(b) => (b.kind, b.message, b.fields),
            Err(_) => (
                "http".to_string(),
                format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                Vec::new(),
            ),
        };
        Err(ClientError::Server {
            status: status.as_u16(),
            kind,
            message,
            fields,
        })
    }
}

/// What a successful join gives the host.
pub struct Joined {
    pub identity: Identity,
    pub credentials: Credentials,
    pub endpoint: ManagerEndpoint,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("identity", &self.identity)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Joins the cluster of the manager at `address` as host `name`.
///
/// The TLS connection presents no client certificate and offers
/// [`JOIN_ALPN`]; the manager's certificate is accepted only if it chains
/// to a CA certificate, sent along, whose SHA-256 is the one in `token`,
/// and is a manager certificate. The credentials that come back are checked
/// against that CA too.
pub async fn join(
    address: &str,
    token: &JoinToken,
    name: &str,
    timeout: Duration,
) -> Result<Joined, ClientError> {
    let label = describe_server(Role::Manager, "");
    let run = async {
        let tcp = tcp_connect(address, &label).await?;
        let config = pinned_config(token.ca_sha256())?;
        // The name is not checked (the pinned CA is): any valid DNS name.
        let server = ServerName::try_from("tandem-manager")
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let tls = tandem_pki::tokio_rustls::TlsConnector::from(config)
            .connect(server, tcp)
            .await
            .map_err(|e| ClientError::Tls {
                address: address.to_string(),
                detail: tls_cause(&e).unwrap_or_else(|| e.to_string()),
                server: label.clone(),
            })?;
        let peer = peer_of(tls.get_ref().1).map_err(|e| ClientError::Tls {
            address: address.to_string(),
            detail: e.to_string(),
            server: label.clone(),
        })?;
        check_role(&peer, Role::Manager, address, &label)?;
        let req = JoinRequest {
            token: token.to_string(),
            name: name.to_string(),
        };
        let to = Server {
            address,
            host_header: "tandem-manager",
            label: &label,
        };
        let creds: Credentials = exchange(tls, &to, Method::POST, "/v1/join", Some(&req)).await?;
        Ok::<_, ClientError>((creds, peer))
    };
    let (credentials, peer) =
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| ClientError::Timeout {
                address: address.to_string(),
                what: "the join".into(),
                after: timeout,
                server: label.clone(),
            })??;
    let ca = tandem_pki::rustls::pki_types::pem::PemObject::from_pem_slice(
        credentials.ca_pem.as_bytes(),
    )
    .map_err(
        |e: tandem_pki::rustls::pki_types::pem::Error| ClientError::Decode {
            what: "the join's CA certificate".into(),
            detail: e.to_string(),
            server: label.clone(),
        },
    )
    .map(|c: CertificateDer<'static>| c)?;
    if cert_sha256(&ca) != token.ca_sha256() {
        return Err(ClientError::Tls {
            address: address.to_string(),
            detail: "the CA certificate in the answer is not the one the token pins".into(),
            server: label.clone(),
        });
    }
    let identity = Identity::from_pem(
        &credentials.cert_pem,
        &credentials.key_pem,
        &credentials.ca_pem,
    )
    .map_err(|e| ClientError::Decode {
        what: "the join's certificate".into(),
        detail: e.to_string(),
        server: label.clone(),
    })?;
    if identity.name() != name || identity.role() != Role::Host {
        return Err(ClientError::Decode {
            what: "the join's certificate".into(),
            server: label.clone(),
            detail: format!(
                "it is for {} {}, not host {name}",
                identity.role(),
                identity.name()
            ),
        });
    }
    let endpoint = ManagerEndpoint {
        address: address.to_string(),
        name: peer.name,
        cluster_id: identity.cluster_id().to_string(),
    };
    Ok(Joined {
        identity,
        credentials,
        endpoint,
    })
}

#[allow(deprecated)] // ring, as tandem_pki
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pinned_config(pin: [u8; 32]) -> Result<Arc<ClientConfig>, ClientError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCa {
        pin,
        provider: Arc::clone(&provider),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Local(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![JOIN_ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Accepts a server certificate that chains to the CA certificate, sent in
/// the chain, whose SHA-256 is `pin`. The name is not checked: the CA is
/// pinned, and the caller checks the certificate's role afterwards.
#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| cert_sha256(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the manager did not present the CA certificate the token pins (sha256 {})",
                    hex(&self.pin)
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.3 only.
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
