//! The replication link's transport: TCP between hosts, or a unix socket
//! (same host: tests and single-machine drills without a network).

use std::path::PathBuf;
use std::pin::Pin;

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
