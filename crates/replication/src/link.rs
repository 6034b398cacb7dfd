//! The replication link's transport: TCP between hosts, or a unix socket
//! (same host: tests and single-machine drills without a network).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

pub use crate::authority::PeerIdentity;

use tandem_supervisor::sock::{bind_unix, remove_stale_socket, SocketPerms};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Where a backup listens, or where a primary connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

/// A string that names no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an endpoint: use HOST:PORT (TCP) or unix:PATH")]
pub struct BadEndpoint(pub String);

impl std::str::FromStr for Endpoint {
    type Err = BadEndpoint;
    fn from_str(s: &str) -> Result<Self, BadEndpoint> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(BadEndpoint(s.to_string()));
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        let addr = s.strip_prefix("tcp:").unwrap_or(s);
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Endpoint::Tcp(addr.to_string()))
            }
            _ => Err(BadEndpoint(s.to_string())),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}
pub type BoxStream = Pin<Box<dyn Stream>>;

/// How a primary reaches its backup: the seam between the protocol and the
/// network. Production connects to an [`Endpoint`]; tests hand the primary
/// one end of an in-memory pipe and play the backup (or a broken network)
/// on the other, so they can drop, stall or cut either direction at a
/// chosen protocol moment.
pub trait Connect: Send + Sync + std::fmt::Display {
    fn connect(&self) -> BoxFuture<'_, std::io::Result<BoxStream>>;
}

pub type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A TCP connect that never answers (a black-holed address) must not hold
/// `unprotect` or a reconnect for the kernel's two minutes.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Connect for Endpoint {
    fn connect(&self) -> BoxFuture<'_, std::io::Result<BoxStream>> {
        Box::pin(async move {
            tokio::time::timeout(CONNECT_TIMEOUT, connect(self))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {CONNECT_TIMEOUT:?}"),
                    )
                })?
        })
    }
}

pub async fn connect(ep: &Endpoint) -> std::io::Result<BoxStream> {
    Ok(match ep {
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect(a).await?;
            // Commit acks are small and latency-critical.
            s.set_nodelay(true)?;
            Box::pin(s)
        }
        Endpoint::Unix(p) => Box::pin(UnixStream::connect(p).await?),
    })
}

/// A backup reached over mutual TLS: the TCP endpoint, and the name its
/// cluster certificate must carry (the host this primary means to protect
/// to, not whoever answers at the address).
#[derive(Clone)]
pub struct TlsEndpoint {
    pub endpoint: Endpoint,
    pub peer_name: String,
    pub client: Arc<tandem_pki::rustls::ClientConfig>,
}

impl std::fmt::Display for TlsEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{} (TLS)", self.peer_name, self.endpoint)
    }
}

/// A handshake that stalls (a peer that connects and says nothing) must not
/// hold a connection slot.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Connect for TlsEndpoint {
    fn connect(&self) -> BoxFuture<'_, std::io::Result<BoxStream>> {
        Box::pin(async move {
            let Endpoint::Tcp(addr) = &self.endpoint else {
                return Err(std::io::Error::other(
                    "TLS is for TCP links; a unix socket is this host's own",
                ));
            };
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {CONNECT_TIMEOUT:?}"),
                    )
                })??;
            tcp.set_nodelay(true)?;
            let (tls, peer) = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tandem_pki::connect(self.client.clone(), &self.peer_name, tcp),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("TLS with {}: {e}", self.peer_name),
                )
            })?;
            peer.require_role(&[tandem_pki::Role::Host]).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{} answered with a {} certificate, not a host's",
                        peer.name, peer.role
                    ),
                )
            })?;
            Ok(Box::pin(tls) as BoxStream)
        })
    }
}

/// Authenticates an accepted connection: with `tls`, a mutual-TLS
/// handshake (bounded in time) whose certificate names the peer; without,
/// the peer is what its transport says (a local socket, or an address).
pub async fn authenticate(
    conn: BoxStream,
    addr: String,
    tls: Option<&Arc<tandem_pki::rustls::ServerConfig>>,
) -> Result<(BoxStream, PeerIdentity), String> {
    let Some(cfg) = tls else {
        let who = if addr.starts_with("unix:") {
            PeerIdentity::Local(addr)
        } else {
            PeerIdentity::Unauthenticated(addr)
        };
        return Ok((conn, who));
    };
    if addr.starts_with("unix:") {
        return Ok((conn, PeerIdentity::Local(addr)));
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tandem_pki::accept(cfg.clone(), conn)).await {
        Ok(Ok((tls, peer))) => Ok((Box::pin(tls), PeerIdentity::Certified { addr, peer })),
        Ok(Err(e)) => Err(format!("{addr}: TLS refused: {e}")),
        Err(_) => Err(format!(
            "{addr}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
        )),
    }
}

/// A stream that fails (both ways) once its [`CutSwitch`] is thrown: how a
/// connection whose peer's certificate is revoked mid-stream is ended. The
/// code serving the stream sees an I/O error, exactly as if the peer had
/// gone away, and handles it as it handles any disconnect (a backup never
/// applies a partial epoch); nothing is cancelled mid-apply.
pub struct CutOff {
    inner: BoxStream,
    cut: Option<tokio::sync::oneshot::Receiver<()>>,
    thrown: bool,
}

/// Ends a [`CutOff`] stream; dropping it leaves the stream alone.
pub struct CutSwitch(tokio::sync::oneshot::Sender<()>);

impl CutSwitch {
    pub fn throw(self) {
        let _ = self.0.send(());
    }

    /// Completes when the stream is gone (its connection ended).
    pub async fn stream_gone(&mut self) {
        self.0.closed().await
    }
}

/// Wraps `inner` so that [`CutSwitch::throw`] ends it.
pub fn cut_off(inner: BoxStream) -> (BoxStream, CutSwitch) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    (
        Box::pin(CutOff {
            inner,
            cut: Some(rx),
            thrown: false,
        }),
        CutSwitch(tx),
    )
}

impl CutOff {
    fn check(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        if !self.thrown {
            if let Some(rx) = self.cut.as_mut() {
                match std::future::Future::poll(Pin::new(rx), cx) {
                    std::task::Poll::Ready(Ok(())) => self.thrown = true,
                    // The switch was dropped: never cut.
                    std::task::Poll::Ready(Err(_)) => self.cut = None,
                    std::task::Poll::Pending => {}
                }
            }
        }
        if self.thrown {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the peer's certificate was revoked",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for CutOff {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        self.inner.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for CutOff {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        self.inner.as_mut().poll_write(cx, data)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        self.inner.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub async fn bind(ep: &Endpoint) -> std::io::Result<Listener> {
        Ok(match ep {
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a).await?),
            Endpoint::Unix(p) => {
                // Mode 0600 from the start (not the umask's), and never
                // over anything but a stale socket: a file, directory or
                // symlink at the path is refused and left alone.
                let l = bind_unix(p, SocketPerms::PRIVATE)?;
                l.set_nonblocking(true)?;
                Listener::Unix(UnixListener::from_std(l)?, p.clone())
            }
        })
    }

    /// The TCP address bound (port 0 binds an ephemeral one).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Accepts one connection and says who it is from.
    pub async fn accept(&self) -> std::io::Result<(BoxStream, String)> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                (Box::pin(s), peer.to_string())
            }
            Listener::Unix(l, p) => {
                let (s, _) = l.accept().await?;
                (Box::pin(s), format!("unix:{}", p.display()))
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            // Only a socket: whatever replaced ours is not ours to delete.
            let _ = remove_stale_socket(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_thrown_cut_ends_a_read_that_waits_and_every_write() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let (mut s, switch) = cut_off(Box::pin(a));
        b.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        // A read that waits for data the peer never sends ends when cut.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            let r = s.read(&mut buf).await;
            (r, s)
        });
        tokio::task::yield_now().await;
        switch.throw();
        let (r, mut s) = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the cut wakes the reader")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionAborted);
        assert!(s.write_all(b"y").await.is_err());
        // A dropped switch never cuts.
        let (c, mut d) = tokio::io::duplex(64);
        let (mut s2, sw2) = cut_off(Box::pin(c));
        drop(sw2);
        s2.write_all(b"z").await.unwrap();
        let mut z = [0u8; 1];
        d.read_exact(&mut z).await.unwrap();
        assert_eq!(&z, b"z");
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "10.0.0.2:7400".parse::<Endpoint>(),
            Ok(Endpoint::Tcp("10.0.0.2:7400".into()))
        );
        assert_eq!(
            "tcp:[::1]:7400".parse::<Endpoint>(),
            Ok(Endpoint::Tcp("[::1]:7400".into()))
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<Endpoint>(),
            Ok(Endpoint::Unix("/run/x.sock".into()))
        );
        for bad in ["", "unix:", "host", "host:port", ":80", "h:99999"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    mod tls {
        use super::super::*;
        use std::time::Duration;
        use tandem_pki::{ClusterCa, NoRevocations, Role};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        struct Cluster {
            _dir: tempfile::TempDir,
            ca: ClusterCa,
        }

        fn cluster(name: &str) -> Cluster {
            let dir = tempfile::tempdir().unwrap();
            let ca = ClusterCa::create(&dir.path().join("ca"), name).unwrap();
            Cluster { _dir: dir, ca }
        }

        fn identity(c: &Cluster, name: &str, role: Role) -> tandem_pki::Identity {
            let issued = c.ca.issue(name, role, Duration::from_secs(3600)).unwrap();
            c.ca.identity(&issued).unwrap()
        }

        fn client(id: &tandem_pki::Identity) -> Arc<tandem_pki::rustls::ClientConfig> {
            tandem_pki::client_config(id, Arc::new(NoRevocations)).unwrap()
        }

        /// A backup `host-b` listening with TLS; the peer each accepted
        /// connection authenticated as (or why not) comes back on the channel.
        async fn backup(
            c: &Cluster,
        ) -> (
            Endpoint,
            tokio::sync::mpsc::UnboundedReceiver<Result<PeerIdentity, String>>,
        ) {
            let id = identity(c, "host-b", Role::Host);
            let cfg = tandem_pki::server_config(&id, Arc::new(NoRevocations)).unwrap();
            let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into()))
                .await
                .unwrap();
            let ep = Endpoint::Tcp(l.local_addr().unwrap().to_string());
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Ok((conn, addr)) = l.accept().await {
                    let cfg = cfg.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match authenticate(conn, addr, Some(&cfg)).await {
                            Ok((mut s, who)) => {
                                let _ = tx.send(Ok(who));
                                let mut b = [0u8; 5];
                                if s.read_exact(&mut b).await.is_ok() {
                                    let _ = s.write_all(&b).await;
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e));
                            }
                        }
                    });
                }
            });
            (ep, rx)
        }

        #[tokio::test]
        async fn a_host_of_the_cluster_is_known_by_its_certificate() {
            let c = cluster("prod");
            let (ep, mut seen) = backup(&c).await;
            let to = TlsEndpoint {
                endpoint: ep,
                peer_name: "host-b".into(),
                client: client(&identity(&c, "host-a", Role::Host)),
            };
            let mut s = to.connect().await.unwrap();
            s.write_all(b"hello").await.unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"hello");
            match seen.recv().await.unwrap().unwrap() {
                PeerIdentity::Certified { peer, .. } => {
                    assert_eq!((peer.name.as_str(), peer.role), ("host-a", Role::Host));
                }
                other => panic!("{other:?}"),
            }
        }

        #[tokio::test]
        async fn another_clusters_host_and_a_plain_peer_are_refused() {
            let c = cluster("prod");
            let (ep, mut seen) = backup(&c).await;
            let stranger = cluster("prod");
            let to = TlsEndpoint {
                endpoint: ep.clone(),
                peer_name: "host-b".into(),
                client: client(&identity(&stranger, "host-a", Role::Host)),
            };
            // The stranger does not trust our backup either.
            assert!(to.connect().await.is_err());
            let e = seen.recv().await.unwrap().unwrap_err();
            assert!(e.contains("TLS refused"), "{e}");

            // Plain TCP, as a version without TLS would speak.
            let Endpoint::Tcp(addr) = &ep else {
                unreachable!()
            };
            let mut plain = TcpStream::connect(addr).await.unwrap();
            plain.write_all(&[0u8; 64]).await.unwrap();
            let e = seen.recv().await.unwrap().unwrap_err();
            assert!(e.contains("TLS refused"), "{e}");
        }

        #[tokio::test]
        async fn a_backup_answering_under_another_name_is_refused() {
            let c = cluster("prod");
            let (ep, _seen) = backup(&c).await;
            let to = TlsEndpoint {
                endpoint: ep,
                peer_name: "host-c".into(),
                client: client(&identity(&c, "host-a", Role::Host)),
            };
            let e = to.connect().await.err().unwrap();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        }
    }

    /// A unix listener is 0600, replaces a stale socket, and never removes
    /// what is not a socket: not at bind, not when it is dropped.
    #[tokio::test]
    async fn a_unix_listener_binds_only_over_a_stale_socket() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("repl.sock");
        let ep = Endpoint::Unix(p.clone());
        std::fs::write(&p, "precious").unwrap();
        let e = Listener::bind(&ep).await.err().unwrap();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "precious");
        std::fs::remove_file(&p).unwrap();

        let stale = std::os::unix::net::UnixListener::bind(&p).unwrap();
        drop(stale);
        let l = Listener::bind(&ep).await.unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _c = connect(&ep).await.unwrap();
        let (_s, peer) = l.accept().await.unwrap();
        assert_eq!(peer, format!("unix:{}", p.display()));
        // Replaced behind the listener's back: dropping it keeps the file.
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, "someone else's").unwrap();
        drop(l);
        assert!(p.exists());
    }
}
