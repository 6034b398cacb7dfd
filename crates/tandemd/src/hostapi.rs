//! tandemd's host API on the management network: the same routes as the
//! unix socket, over mutual TLS, for the cluster's manager and operators.
//!
//! - Only a certificate of this host's cluster with the **manager** or
//!   **operator** role is admitted; another host's certificate, one from
//!   another cluster, an expired or revoked one, or none at all fails the
//!   handshake (the revocation list is asked on every handshake).
//! - **One request per connection** (no keep-alive): every request is a
//!   fresh handshake over the network as it is configured now. That is what
//!   makes a switch transaction's commit proof that the manager reached the
//!   host over the new configuration, and it means a revocation cannot be
//!   outlived by a kept-alive connection.
//! - Bounds: the handshake within [`HANDSHAKE_TIMEOUT`], request headers
//!   within [`HEADER_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once.
//!
//! Each request carries the caller ([`RemoteCaller`]) in its extensions,
//! so routes can tell a remote caller from the local socket and log who
//! asked.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::cluster::ClusterLink;
use crate::switchtxn::RemoteCaller;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_CONNECTIONS: usize = 256;

/// A connection once its mutual-TLS handshake is done.
pub type TlsServerStream = tandem_pki::tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    cluster: Arc<ClusterLink>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    let tls = {
        let cluster = cluster.clone();
        move || cluster.host_api_server()
    };
    accept_tls(
        "host API",
        listener,
        MAX_CONNECTIONS,
        tls,
        move |stream, peer, remote| {
            let app = app.clone();
            async move {
                debug!(%remote, name = %peer.name, role = %peer.role, "host API connection");
                let caller = RemoteCaller {
                    name: peer.name,
                    role: peer.role,
                };
                let service = hyper::service::service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(caller.clone());
                        app.clone().oneshot(req)
                    },
                );
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    debug!(%remote, "host API connection: {e}");
                }
            }
        },
        shutdown,
    )
    .await;
    info!("host API stopped");
}

/// The accept loop every mutual-TLS listener of tandemd shares: at most
/// `max` connections at once (more are dropped), the TLS configuration
/// built per connection by `tls` (so a renewed identity or a new
/// revocation takes effect at once), the handshake within
/// [`HANDSHAKE_TIMEOUT`], then `handle` on its own task. Ends when
/// `shutdown` completes, aborting the connections in flight.
pub async fn accept_tls<H, F>(
    what: &'static str,
    listener: TcpListener,
    max: usize,
    tls: impl Fn() -> anyhow::Result<Arc<tandem_pki::rustls::ServerConfig>>,
    handle: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(TlsServerStream, tandem_pki::Peer, std::net::SocketAddr) -> F
        + Clone
        + Send
        + Sync
        + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max));
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!("{what} accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            warn!(%remote, "{what}: too many connections; dropping one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let config = match tls() {
            Ok(c) => c,
            Err(e) => {
                warn!("{what} TLS: {e:#}");
                continue;
            }
        };
        // The handshake runs on the connection's task, so a slow client
        // holds only its own permit.
        let handle = handle.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let accepted =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, tandem_pki::accept(config, tcp)).await;
            let (stream, peer) = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    warn!(%remote, "{what}: TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "{what}: TLS handshake timed out");
                    return;
                }
            };
            handle(stream, peer, remote).await;
        });
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}
