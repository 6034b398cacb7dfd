//! A manager on 127.0.0.1 (an ephemeral port) in this process, with a
//! real state directory and store, and clients with real certificates.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tandem_manager::api::{CreateTokenRequest, CreatedToken};
use tandem_manager::client::{join, Joined, ManagerClient, ManagerEndpoint};
use tandem_manager::clock::SystemClock;
use tandem_manager::model::JoinToken;
use tandem_manager::server::{serve, ManagerTls};
use tandem_manager::state::{init, manager_identity, InitOptions, StateDir};
use tandem_manager::store::{RedbStore, Store};
use tandem_manager::{Manager, Settings};
use tandem_pki::rustls::{self, ClientConfig, RootCertStore};
use tandem_pki::{ClusterCa, Identity, NoRevocations, Role};
use tokio::sync::oneshot;

/// Every wait in these tests is bounded by this.
pub const BOUND: Duration = Duration::from_secs(20);

pub async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

pub struct Running {
    pub addr: SocketAddr,
    pub manager: Arc<Manager>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub state: StateDir,
    pub ca: ClusterCa,
    pub operator: Identity,
    pub settings: Settings,
    pub running: Option<Running>,
    /// The port, kept across restarts.
    pub port: u16,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(Settings::default()).await
    }

    pub async fn start_with(settings: Settings) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("manager"));
        init(
            &state,
            &InitOptions {
                cluster_name: "test".into(),
                listen: "127.0.0.1:0".into(),
                advertise: "127.0.0.1:0".into(),
                ..InitOptions::default()
            },
        )
        .unwrap();
        let ca = state.load_ca().unwrap();
        let operator = Identity::load(&state.operator_dir()).unwrap();
        let mut h = Harness {
            dir,
            state,
            ca,
            operator,
            settings,
            running: None,
            port: 0,
        };
        h.run().await;
        h
    }

    async fn run(&mut self) {
        let config = self.state.config().unwrap();
        let ca = self.state.load_ca().unwrap();
        let (identity, _) = manager_identity(&self.state, &ca, &config.manager_name).unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&self.state.db_path()).unwrap());
        let manager = Manager::open(
            store,
            ca,
            &config.manager_name,
            Arc::new(SystemClock),
            self.settings.clone(),
        )
        .await
        .unwrap();
        manager.set_manager_cert_not_after(identity.not_after());
        manager.set_identity(&identity).unwrap();
        let tls = Arc::new(ManagerTls::new(identity, manager.revocation_list()).unwrap());
        // The same port after a restart if it is still free; clients take
        // the address from `addr()` either way.
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let addr = listener.local_addr().unwrap();
        self.port = addr.port();
        let (stop, stopped) = oneshot::channel::<()>();
        let m = Arc::clone(&manager);
        let task = tokio::spawn(async move {
            serve(listener, m, tls, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        self.running = Some(Running {
            addr,
            manager,
            stop,
            task,
        });
    }

    pub async fn stop(&mut self) {
        let r = self.running.take().expect("running");
        let _ = r.stop.send(());
        bounded("manager shutdown", r.task).await.unwrap();
        drop(r.manager);
    }

    /// Stops the manager and starts a new one on the same state directory
    /// and port: what a restart of the daemon does.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.run().await;
    }

    pub fn addr(&self) -> String {
        self.running.as_ref().expect("running").addr.to_string()
    }

    pub fn manager(&self) -> &Arc<Manager> {
        &self.running.as_ref().expect("running").manager
    }

    pub fn endpoint(&self) -> ManagerEndpoint {
        ManagerEndpoint {
            address: self.addr(),
            name: "manager".into(),
            cluster_id: self.ca.cluster_id().into(),
        }
    }

    /// A client presenting `id`.
    pub fn client(&self, id: &Identity) -> ManagerClient {
        ManagerClient::new(self.endpoint(), id, Arc::new(NoRevocations))
            .unwrap()
            .with_timeout(BOUND)
    }

    pub fn operator_client(&self) -> ManagerClient {
        self.client(&self.operator)
    }

    pub async fn token(&self, host: Option<&str>) -> CreatedToken {
        self.operator_client()
            .post(
                "/v1/tokens",
                &CreateTokenRequest {
                    host: host.map(String::from),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
    }

    /// Joins `name` through the real join connection.
    pub async fn join(&self, name: &str) -> Joined {
        let t: JoinToken = self.token(None).await.token.parse().unwrap();
        join(&self.addr(), &t, name, BOUND).await.unwrap()
    }

    /// A certificate straight from the CA (not through a join).
    pub fn issue(&self, name: &str, role: Role) -> Identity {
        let issued = self
            .ca
            .issue(name, role, Duration::from_secs(3600))
            .unwrap();
        self.ca.identity(&issued).unwrap()
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

/// A TLS client that trusts `trust`'s CA and presents `present` (or no
/// certificate): for clients the normal configuration would not build
/// (another cluster's certificate towards this manager).
pub fn raw_config(trust: &Identity, present: Option<&Identity>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(trust.ca_der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match present {
        Some(id) => b
            .with_client_auth_cert(id.cert_chain().to_vec(), id.private_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// One HTTP request over TLS with `config`: `Ok((status, body))` if the
/// manager answered at all, `Err` if TLS (or the connection) failed.
pub async fn raw_request(
    addr: &str,
    config: Arc<ClientConfig>,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    bounded("raw request", async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("manager").unwrap();
        let tls = tandem_pki::tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "manager")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
}
