//! The manager's TLS listener.
//!
//! One TCP address serves two kinds of connection, told apart by the ALPN
//! protocol in the client's hello (read with rustls's lazy acceptor before
//! any configuration is chosen):
//!
//! - **mutual TLS** (everything but a join): `tandem_pki::server_config`,
//!   which requires a client certificate that chains to the cluster CA,
//!   is within its validity, carries this cluster's id and is not on the
//!   manager's revocation list (asked on every handshake: a revocation
//!   takes effect from the next connection). The authenticated
//!   [`Peer`](tandem_pki::Peer) goes into every request of the connection
//!   ([`ConnInfo`]); routes check its role per request ([`crate::http`]).
//! - **join** (the client offers [`JOIN_ALPN`]): server-authenticated TLS
//!   only, because the joining host has no certificate yet; the token in
//!   the request authorises. This connection reaches `POST /v1/join` and
//!   nothing else. The manager sends the CA certificate after its own in
//!   the chain, so that the host can check it against the SHA-256 its
//!   token pins before it trusts anything.
//!
//! Every connection has bounds: the TLS handshake must finish within
//! [`HANDSHAKE_TIMEOUT`], request headers within [`HEADER_TIMEOUT`], and at
//! most [`MAX_CONNECTIONS`] are served at once.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::RwLock;
use tandem_pki::rustls::server::{Acceptor, NoServerSessionStorage};
use tandem_pki::rustls::{self, ServerConfig};
use tandem_pki::tokio_rustls::LazyConfigAcceptor;
use tandem_pki::{peer_of, Identity, PkiError, Revocations};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::api::JOIN_ALPN;
use crate::http::{join_router, router, ConnInfo};
use crate::service::Manager;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a graceful shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

struct TlsInner {
    identity: Identity,
    mtls: Arc<ServerConfig>,
    join: Arc<ServerConfig>,
}

/// The manager's TLS configurations, replaceable when its own certificate
/// is renewed (new connections use the new one).
pub struct ManagerTls {
    revocations: Arc<dyn Revocations>,
    inner: RwLock<TlsInner>,
}

impl ManagerTls {
    /// `identity` must be a manager certificate; `revocations` is asked on
    /// every mutual-TLS handshake.
    pub fn new(identity: Identity, revocations: Arc<dyn Revocations>) -> Result<Self, PkiError> {
        let inner = Self::build(identity, &revocations)?;
        Ok(ManagerTls {
            revocations,
            inner: RwLock::new(inner),
        })
    }

    fn build(identity: Identity, revocations: &Arc<dyn Revocations>) -> Result<TlsInner, PkiError> {
        if identity.role() != tandem_pki::Role::Manager {
            return Err(PkiError::WrongRole {
                name: identity.name().to_string(),
                role: identity.role(),
                expected: "manager".into(),
            });
        }
        let mtls = tandem_pki::server_config(&identity, Arc::clone(revocations))?;
        let join = join_config(&identity)?;
        Ok(TlsInner {
            identity,
            mtls,
            join,
        })
    }

    /// Switches to a new identity (a renewed manager certificate).
    pub fn replace(&self, identity: Identity) -> Result<(), PkiError> {
        let inner = Self::build(identity, &self.revocations)?;
        *self.inner.write() = inner;
        Ok(())
    }

    pub fn identity(&self) -> Identity {
        self.inner.read().identity.clone()
    }

    fn configs(&self) -> (Arc<ServerConfig>, Arc<ServerConfig>) {
        let i = self.inner.read();
        (Arc::clone(&i.mtls), Arc::clone(&i.join))
    }
}

#[allow(deprecated)] // see tandem_pki's provider(): ring, as the whole project
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server-authenticated TLS for joins: no client certificate; the chain
/// sent is the manager's certificate and then the CA's.
fn join_config(identity: &Identity) -> Result<Arc<ServerConfig>, PkiError> {
    let mut chain = identity.cert_chain().to_vec();
    chain.push(identity.ca_der().clone());
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, identity.private_key())?;
    cfg.alpn_protocols = vec![JOIN_ALPN.to_vec()];
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Serves the API on `listener` until `shutdown` completes, then stops
/// accepting and gives requests in flight [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    listener: TcpListener,
    manager: Arc<Manager>,
    tls: Arc<ManagerTls>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let api = router(Arc::clone(&manager));
    let join_api = join_router(manager);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connections.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            warn!(%remote, "too many connections; dropping one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let watcher = graceful.watcher();
        let (api, join_api, tls) = (api.clone(), join_api.clone(), Arc::clone(&tls));
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(tcp, remote, &tls, api, join_api, watcher).await {
                debug!(%remote, "connection: {e}");
            }
        });
    }
    drop(listener);
    info!("no longer accepting; finishing requests in flight");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("requests still running after {SHUTDOWN_GRACE:?}; stopping anyway");
    }
    // Connections still in their handshake, and any left over: when this
    // returns, nothing holds the manager (or its store) any more.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn connection(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: &ManagerTls,
    api: Router,
    join_api: Router,
    watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), String> {
    let handshake = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), tcp)
            .await
            .map_err(|e| format!("client hello: {e}"))?;
        let joining = start
            .client_hello()
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == JOIN_ALPN));
        let (mtls, join) = tls.configs();
        let config = if joining { join } else { mtls };
        let stream = start.into_stream(config).await.map_err(|e| {
            // A refused client certificate lands here: worth a line.
            if e.get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .is_some()
            {
                warn!(%remote, "TLS handshake refused: {e}");
            }
            format!("TLS handshake: {e}")
        })?;
        Ok::<_, String>((stream, joining))
    };
    let (stream, joining) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| "TLS handshake timed out".to_string())??;
    let peer = if joining {
        None
    } else {
        Some(peer_of(stream.get_ref().1).map_err(|e| format!("peer: {e}"))?)
    };
    if let Some(p) = &peer {
        debug!(%remote, name = %p.name, role = %p.role, "authenticated connection");
    }
    let info = ConnInfo {
        peer,
        remote: Some(remote),
    };
    let app = if joining { join_api } else { api };
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(info.clone());
            app.clone().oneshot(req)
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    watcher.watch(conn).await.map_err(|e| format!("HTTP: {e}"))
}
