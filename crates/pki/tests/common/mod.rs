#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tandem_pki::{
    accept, client_config, connect, server_config, ClusterCa, Identity, NoRevocations, Peer,
    PkiError, Revocations, Role,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const DAY: Duration = Duration::from_secs(24 * 3600);

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ca: ClusterCa,
}

impl Cluster {
    pub fn new(name: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(&dir.path().join("ca"), name).unwrap();
        Cluster { dir, ca }
    }

    pub fn identity(&self, name: &str, role: Role) -> Identity {
        let issued = self.ca.issue(name, role, DAY).unwrap();
        self.ca.identity(&issued).unwrap()
    }

    /// A certificate valid from `from` to `to`, relative to now.
    pub fn identity_between(&self, name: &str, role: Role, from: i64, to: i64) -> Identity {
        let at = |secs: i64| {
            if secs >= 0 {
                SystemTime::now() + Duration::from_secs(secs as u64)
            } else {
                SystemTime::now() - Duration::from_secs((-secs) as u64)
            }
        };
        let issued = self.ca.issue_between(name, role, at(from), at(to)).unwrap();
        self.ca.identity(&issued).unwrap()
    }
}

pub fn none() -> Arc<dyn Revocations> {
    Arc::new(NoRevocations)
}

/// Outcome of one connection: what each side saw. `Ok` on a side means the
/// handshake completed there and one application round trip worked.
pub struct Outcome {
    pub server: Result<Peer, PkiError>,
    pub client: Result<Peer, PkiError>,
}

/// A real TLS handshake over an in-memory duplex pipe with the given
/// configurations, then a ping/pong so that a rejection the client only
/// learns after its side of a TLS 1.3 handshake shows up too.
pub async fn run(
    server_cfg: Arc<tandem_pki::rustls::ServerConfig>,
    client_cfg: Arc<tandem_pki::rustls::ClientConfig>,
    dial: &str,
) -> Outcome {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let server = async move {
        let (mut tls, peer) = accept(server_cfg, s).await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(PkiError::Handshake)?;
        assert_eq!(&buf, b"ping");
        tls.write_all(b"pong").await.map_err(PkiError::Handshake)?;
        tls.shutdown().await.map_err(PkiError::Handshake)?;
        Ok(peer)
    };
    let client = async move {
        let (mut tls, peer) = connect(client_cfg, dial, c).await?;
        tls.write_all(b"ping").await.map_err(PkiError::Handshake)?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(PkiError::Handshake)?;
        assert_eq!(&buf, b"pong");
        Ok(peer)
    };
    let (server, client) = tokio::join!(server, client);
    Outcome { server, client }
}

/// The usual pair: `server_id` serves, `client_id` dials it by name.
pub async fn pair(
    server_id: &Identity,
    server_revoked: Arc<dyn Revocations>,
    client_id: &Identity,
    client_revoked: Arc<dyn Revocations>,
) -> Outcome {
    let s = server_config(server_id, server_revoked).unwrap();
    let c = client_config(client_id, client_revoked).unwrap();
    run(s, c, server_id.name()).await
}
