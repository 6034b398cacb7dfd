//! HTTP/1.1 client for tandemd: over its unix socket, or over any stream a
//! [`Connector`] opens (the CLI's mutual-TLS connection to a host's API on
//! the management network; this crate stays free of TLS).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach tandemd at {path}: {source} (is tandemd running? see `tandemd --help`)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Opening a connector's stream failed (TCP, or its TLS handshake).
    #[error("cannot reach tandemd at {target}: {detail}")]
    Remote { target: String, detail: String },
    #[error("tandemd did not answer {what} within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("HTTP error talking to tandemd: {0}")]
    Http(String),
    #[error("tandemd sent a response that is not valid JSON for {what}: {detail}")]
    Decode { what: String, detail: String },
    /// tandemd answered with an error.
    #[error("{}", format_server_error(.status, .body))]
    Server { status: u16, body: ErrorBody },
}

fn format_server_error(_status: &u16, body: &ErrorBody) -> String {
    let mut s = body.message.clone();
    for f in &body.fields {
        s.push_str(&format!("\n  {}: {}", f.field, f.message));
    }
    s
}

impl ApiError {
    /// The server's error kind, if the server answered with an error.
    pub fn kind(&self) -> Option<&str> {
        match self {
            ApiError::Server { body, .. } => Some(&body.kind),
            _ => None,
        }
    }
}

/// A byte stream to tandemd that a [`Connector`] opened.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// What [`Connector::connect`] returns.
pub type Connecting = Pin<Box<dyn Future<Output = Result<Box<dyn Stream>, String>> + Send>>;

/// Opens one connection to a tandemd that is not on a local socket.
pub trait Connector: std::fmt::Debug + Send + Sync {
    fn connect(&self) -> Connecting;
    /// Where it connects, for messages.
    fn target(&self) -> String;
}

/// A client for one tandemd. Each request uses a fresh connection, which
/// keeps the client trivially safe to share and retry.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    remote: Option<Arc<dyn Connector>>,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Client {
            socket: socket.as_ref().to_path_buf(),
            remote: None,
            timeout: Duration::from_secs(120),
        }
    }

    /// A client that reaches tandemd through `connector` (a host's API).
    pub fn remote(connector: Arc<dyn Connector>) -> Self {
        Client {
            socket: PathBuf::new(),
            remote: Some(connector),
            timeout: Duration::from_secs(120),
        }
    }

    /// Bounds each whole request, including long ones such as a graceful stop.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.request(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.request(Method::DELETE, path, None::<&()>).await
    }

    async fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let what = format!("{method} {path}");
        match tokio::time::timeout(self.timeout, self.request_inner(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout {
                what,
                after: self.timeout,
            }),
        }
    }

    async fn request_inner<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let stream: Box<dyn Stream> = match &self.remote {
            Some(c) => c.connect().await.map_err(|detail| ApiError::Remote {
                target: c.target(),
                detail,
            })?,
            None => Box::new(UnixStream::connect(&self.socket).await.map_err(|source| {
                ApiError::Connect {
                    path: self.socket.clone(),
                    source,
                }
            })?),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ApiError::Http(e.to_string()))?;
        let conn_task = tokio::spawn(conn);

        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ApiError::Http(e.to_string()))?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "tandemd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ApiError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ApiError::Http(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ApiError::Http(e.to_string()))?
            .to_bytes();
        conn_task.abort();

        if status.is_success() {
            serde_json::from_slice(&body).map_err(|e| ApiError::Decode {
                what: path.to_string(),
                detail: e.to_string(),
            })
        } else {
            let body = serde_json::from_slice::<ErrorBody>(&body).unwrap_or_else(|_| ErrorBody {
                kind: if status == StatusCode::NOT_FOUND {
                    "not-found"
                } else {
                    "http"
                }
                .to_string(),
                message: format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                fields: Vec::new(),
            });
            Err(ApiError::Server {
                status: status.as_u16(),
                body,
            })
        }
    }
}
