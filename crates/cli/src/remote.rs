//! `tandem --remote NAME[@HOST:PORT] …`: the host commands against another
//! host's tandemd, over its host API (mutual TLS with an operator
//! certificate), instead of the local unix socket. Without an address, the
//! manager says where the host's API is (the address its heartbeats
//! report).

use std::sync::Arc;

use anyhow::Context;
use tandem_api::{Connecting, Connector};
use tandem_pki::rustls::ClientConfig;
use tandem_pki::{Identity, NoRevocations, Role};

/// How long connecting to a host's API may take (TCP and TLS each).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A host's API: its certificate name and, if given, its address.
#[derive(Debug, Clone)]
pub struct RemoteHost {
    pub name: String,
    pub address: String,
}

/// What `--remote` names: a host and maybe where its API is.
#[derive(Debug, Clone)]
pub struct RemoteArg {
    pub name: String,
    pub address: Option<String>,
}

impl std::str::FromStr for RemoteArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('@') {
            Some(_) => s.parse::<RemoteHost>().map(|h| RemoteArg {
                name: h.name,
                address: Some(h.address),
            }),
            None if !s.is_empty() => Ok(RemoteArg {
                name: s.into(),
                address: None,
            }),
            None => Err("--remote needs a host name".into()),
        }
    }
}

impl std::str::FromStr for RemoteHost {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, address) = s.split_once('@').ok_or_else(|| {
            format!("`{s}`: give the host as NAME@HOST:PORT (its certificate name, and where its --host-api listens)")
        })?;
        if name.is_empty() || address.is_empty() {
            return Err(format!("`{s}`: NAME@HOST:PORT, both parts"));
        }
        Ok(RemoteHost {
            name: name.into(),
            address: address.into(),
        })
    }
}

/// Dials the host and completes mutual TLS, checking that the server is
/// the named host of our cluster with a host certificate.
struct TlsConnector {
    host: RemoteHost,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Connector for TlsConnector {
    fn connect(&self) -> Connecting {
        let (host, config) = (self.host.clone(), self.config.clone());
        Box::pin(async move {
            // A host cut off from the management network drops the SYN:
            // say so after a while instead of waiting out the request's
            // whole bound.
            let tcp = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio::net::TcpStream::connect(&host.address),
            )
            .await
            .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let (tls, peer) = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tandem_pki::connect(config, &host.name, tcp),
            )
            .await
            .map_err(|_| format!("no TLS handshake within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("TLS: {e}"))?;
            if peer.role != Role::Host {
                return Err(format!(
                    "{} answered with a {} certificate, not a host's",
                    peer.name, peer.role
                ));
            }
            Ok(Box::new(tls) as Box<dyn tandem_api::Stream>)
        })
    }

    fn target(&self) -> String {
        format!("{}@{}", self.host.name, self.host.address)
    }
}

/// A client for the host `arg` names, presenting the identity in
/// `identity_dir`; asks the manager for the host's API address when `arg`
/// has none.
pub async fn client(arg: RemoteArg, identity_dir: &str) -> anyhow::Result<tandem_api::Client> {
    let host = resolve(arg, identity_dir).await?;
    connect_to(host, identity_dir)
}

/// The host `arg` names, with its API address (the manager's record when
/// `arg` has none).
pub async fn resolve(arg: RemoteArg, identity_dir: &str) -> anyhow::Result<RemoteHost> {
    Ok(match arg.address {
        Some(address) => RemoteHost {
            name: arg.name,
            address,
        },
        None => {
            let manager = crate::cluster::ManagerOpts::with_identity(identity_dir).client()?;
            let view: serde_json::Value = manager
                .get(&format!("/v1/hosts/{}", arg.name))
                .await
                .with_context(|| format!("asking the manager where {} is", arg.name))?;
            let address = view["host_api"].as_str().map(str::to_string).ok_or_else(|| {
                anyhow::anyhow!(
                    "the manager knows no host API address for {} (its tandemd runs without --host-api, or has not reported yet); give --remote {}@HOST:PORT",
                    arg.name,
                    arg.name
                )
            })?;
            RemoteHost {
                name: arg.name,
                address,
            }
        }
    })
}

pub fn connect_to(host: RemoteHost, identity_dir: &str) -> anyhow::Result<tandem_api::Client> {
    let id = Identity::load(std::path::Path::new(identity_dir)).with_context(|| {
        format!("loading the identity for --remote from {identity_dir} (--identity names another)")
    })?;
    // The server's revocation is the manager's to enforce; an operator's
    // CLI has no list of its own.
    let config = tandem_pki::client_config(&id, Arc::new(NoRevocations))
        .context("building TLS for --remote")?;
    Ok(tandem_api::Client::remote(Arc::new(TlsConnector {
        host,
        config,
    })))
}
