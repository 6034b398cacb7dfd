//! Fan-out deployment on this host: the image service other hosts pull
//! copies from, and the copies, local copies and probes the manager asks
//! for (`/v1/deploy/…`, see `tandem_api::deploy`).
//!
//! - **The image service** (`--image-listen`) is a data path between hosts,
//!   like the replication listener: mutual TLS with host certificates of
//!   this cluster (and the manager's and operators'), one request per
//!   connection, read only. A request is one JSON line; the answer is one
//!   JSON line and then exactly the bytes it announced.
//! - **A copy** streams into `NAME.partial` in the image directory while
//!   hashing, fsyncs it, compares the SHA-256 with the one the manager
//!   gave, renames it into place and fsyncs the directory: a name without
//!   `.partial` is always a whole, verified image, whatever fails or
//!   crashes. A copy that fails or is cancelled removes its partial file.
//! - **A local copy** is a reflink (`FICLONE`) where the filesystem shares
//!   blocks, else a full byte copy. Not a qcow2 overlay: a clone's disk is
//!   then a file of its own that outlives its base and migrates alone.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use tandem_api::deploy::{
    valid_image_name, CopyRequest, CopyState, CopyStatus, ImageInfo, LocalCopyDone,
    LocalCopyMethod, LocalCopyRequest, ProbeRequest, ProbeResult, ServiceAnswer, ServiceAsk,
    MAX_PROBE_BYTES, MAX_SERVICE_LINE, PARTIAL_SUFFIX,
};
use tandem_api::ErrorKind;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::cluster::ClusterLink;
use crate::error::HttpError;

/// Bound on connecting to another host's image service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A copy that receives nothing for this long has failed.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many image-service connections at once.
const MAX_SERVICE_CONNECTIONS: usize = 64;
/// Finished copies' statuses kept for the manager to read.
const KEEP_FINISHED: usize = 1024;
const CHUNK: usize = 1 << 20;

/// This host's side of deployments.
pub struct Deploy {
    dir: PathBuf,
    cluster: Option<Arc<ClusterLink>>,
    copies: Mutex<HashMap<String, CopyJob>>,
}

struct CopyJob {
    status: Arc<Mutex<CopyStatus>>,
    cancel: tokio::sync::watch::Sender<bool>,
    done: tokio::sync::watch::Receiver<bool>,
    started: Instant,
}

impl Deploy {
    pub fn new(dir: PathBuf, cluster: Option<Arc<ClusterLink>>) -> Arc<Deploy> {
        Arc::new(Deploy {
            dir,
            cluster,
            copies: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, name: &str) -> Result<PathBuf, HttpError> {
        valid_image_name(name).map_err(HttpError::invalid)?;
        Ok(self.dir.join(name))
    }

    fn client_tls(&self) -> Result<Arc<tandem_pki::rustls::ClientConfig>, HttpError> {
        let c = self.cluster.as_ref().ok_or_else(|| {
            HttpError::new(
                ErrorKind::BadState,
                "this host has no cluster identity: copies between hosts need one",
            )
        })?;
        c.client()
            .map_err(|e| HttpError::new(ErrorKind::Internal, format!("{e:#}")))
    }

    fn free_bytes(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(0)
    }

    async fn image(&self, name: &str) -> Result<ImageInfo, HttpError> {
        let path = self.path(name)?;
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    HttpError::not_found(format!("no image {name:?} in {}", self.dir.display()))
                }
                _ => HttpError::new(ErrorKind::Internal, format!("{}: {e}", path.display())),
            })?;
        if !meta.is_file() {
            return Err(HttpError::invalid(format!(
                "{} is not a file",
                path.display()
            )));
        }
        let p = path.clone();
        let sha256 = tokio::task::spawn_blocking(move || cached_sha256(&p))
            .await
            .map_err(|e| HttpError::new(ErrorKind::Internal, e))?
            .map_err(|e| HttpError::new(ErrorKind::Internal, format!("{}: {e}", path.display())))?;
        Ok(ImageInfo {
            name: name.to_string(),
            path: path.display().to_string(),
            bytes: meta.len(),
            sha256,
            free_bytes: self.free_bytes(),
        })
    }

    fn start_copy(self: &Arc<Self>, req: CopyRequest) -> Result<CopyStatus, HttpError> {
        let dest = self.path(&req.dest)?;
        valid_image_name(&req.image).map_err(HttpError::invalid)?;
        if req.id.is_empty() || req.id.len() > 128 {
            return Err(HttpError::invalid("a copy's id has 1 to 128 bytes"));
        }
        if req.sha256.len() != 64 || !req.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(HttpError::invalid("sha256 must be 64 hex digits"));
        }
        let tls = self.client_tls()?;
        if dest.exists() {
            return Err(HttpError::conflict(format!(
                "{} exists: a copy never overwrites a file",
                dest.display()
            )));
        }
        if req.bytes > self.free_bytes() {
            return Err(HttpError::new(
                ErrorKind::BadState,
                format!(
                    "{} has {} MiB free; the image needs {} MiB",
                    self.dir.display(),
                    self.free_bytes() >> 20,
                    req.bytes.div_ceil(1 << 20)
                ),
            ));
        }
        let mut copies = self.copies.lock();
        if copies.contains_key(&req.id) {
            return Err(HttpError::conflict(format!("copy {} exists", req.id)));
        }
        if copies.values().any(|c| {
            c.status.lock().dest == req.dest && c.status.lock().state == CopyState::Running
        }) {
            return Err(HttpError::conflict(format!(
                "a copy into {} is running",
                req.dest
            )));
        }
        if copies.len() >= KEEP_FINISHED {
            let mut ended: Vec<(Instant, String)> = copies
                .iter()
                .filter(|(_, c)| c.status.lock().state != CopyState::Running)
                .map(|(id, c)| (c.started, id.clone()))
                .collect();
            ended.sort();
            for (_, id) in ended.iter().take(copies.len() + 1 - KEEP_FINISHED) {
                copies.remove(id);
            }
        }
        let status = Arc::new(Mutex::new(CopyStatus {
            id: req.id.clone(),
            from_host: req.from_host.clone(),
            dest: req.dest.clone(),
            state: CopyState::Running,
            bytes_done: 0,
            bytes_total: req.bytes,
            elapsed_ms: 0,
            error: None,
        }));
        let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        copies.insert(
            req.id.clone(),
            CopyJob {
                status: status.clone(),
                cancel: cancel_tx,
                done: done_rx,
                started,
            },
        );
        drop(copies);
        let first = status.lock().clone();
        info!(id = %req.id, from = %req.from_host, image = %req.image, dest = %req.dest, "deploy copy started");
        tokio::spawn(async move {
            let partial = partial_of(&dest);
            let outcome = tokio::select! {
                r = pull(&tls, &req, &partial, &dest, &status) => r.map(|()| CopyState::Done),
                _ = wait_cancel(cancel_rx) => Ok(CopyState::Cancelled),
            };
            let state = match outcome {
                Ok(s) => s,
                Err(e) => {
                    warn!(id = %req.id, "deploy copy failed: {e}");
                    status.lock().error = Some(e);
                    CopyState::Failed
                }
            };
            if state != CopyState::Done {
                let _ = tokio::fs::remove_file(&partial).await;
            }
            {
                let mut s = status.lock();
                s.state = state;
                s.elapsed_ms = started.elapsed().as_millis() as u64;
            }
            info!(id = %req.id, state = ?state, ms = started.elapsed().as_millis() as u64, "deploy copy ended");
            let _ = done_tx.send(true);
        });
        Ok(first)
    }

    fn copy_status(&self, id: &str) -> Result<CopyStatus, HttpError> {
        let copies = self.copies.lock();
        let job = copies
            .get(id)
            .ok_or_else(|| HttpError::not_found(format!("no copy {id} on this host")))?;
        let mut s = job.status.lock().clone();
        if s.state == CopyState::Running {
            s.elapsed_ms = job.started.elapsed().as_millis() as u64;
        }
        Ok(s)
    }

    async fn cancel_copy(&self, id: &str) -> Result<CopyStatus, HttpError> {
        let mut done = {
            let copies = self.copies.lock();
            let job = copies
                .get(id)
                .ok_or_else(|| HttpError::not_found(format!("no copy {id} on this host")))?;
            let _ = job.cancel.send(true);
            job.done.clone()
        };
        // Answer once the partial file is gone, so that the caller can
        // report it deleted.
        let _ = tokio::time::timeout(Duration::from_secs(30), done.wait_for(|d| *d)).await;
        self.copy_status(id)
    }

    async fn local_copy(&self, req: LocalCopyRequest) -> Result<LocalCopyDone, HttpError> {
        let source = self.path(&req.source)?;
        let dest = self.path(&req.dest)?;
        if dest.exists() {
            return Err(HttpError::conflict(format!(
                "{} exists: a copy never overwrites a file",
                dest.display()
            )));
        }
        let started = Instant::now();
        let free = self.free_bytes();
        let d = dest.clone();
        let (method, bytes) = tokio::task::spawn_blocking(move || local_copy(&source, &d, free))
            .await
            .map_err(|e| HttpError::new(ErrorKind::Internal, e))?
            .map_err(|e| HttpError::new(ErrorKind::BadState, e))?;
        info!(dest = %dest.display(), ?method, "deploy local copy made");
        Ok(LocalCopyDone {
            dest: req.dest,
            method,
            bytes,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    async fn remove_partial(&self, name: &str) -> Result<(), HttpError> {
        let path = partial_of(&self.path(name)?);
        let running =
            self.copies.lock().values().any(|c| {
                c.status.lock().dest == name && c.status.lock().state == CopyState::Running
            });
        if running {
            return Err(HttpError::conflict(format!(
                "a copy into {name} is running: cancel it first"
            )));
        }
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HttpError::new(
                ErrorKind::Internal,
                format!("{}: {e}", path.display()),
            )),
        }
    }

    async fn probe(&self, req: ProbeRequest) -> Result<ProbeResult, HttpError> {
        if req.bytes == 0 || req.bytes > MAX_PROBE_BYTES {
            return Err(HttpError::invalid(format!(
                "a probe moves 1 byte to {} MiB",
                MAX_PROBE_BYTES >> 20
            )));
        }
        let tls = self.client_tls()?;
        let started = Instant::now();
        let (mut stream, len) = ask(
            &tls,
            &req.from_host,
            &req.from_address,
            &ServiceAsk::Probe { bytes: req.bytes },
        )
        .await
        .map_err(|e| HttpError::new(ErrorKind::BadState, e))?;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        while got < len {
            let n = tokio::time::timeout(STALL_TIMEOUT, stream.read(&mut buf))
                .await
                .map_err(|_| HttpError::new(ErrorKind::BadState, "the probe stalled"))?
                .map_err(|e| HttpError::new(ErrorKind::BadState, format!("probe: {e}")))?;
            if n == 0 {
                return Err(HttpError::new(
                    ErrorKind::BadState,
                    format!("the probe ended after {got} of {len} bytes"),
                ));
            }
            got += n as u64;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-6);
        Ok(ProbeResult {
            bytes: got,
            elapsed_ms: secs * 1000.0,
            bytes_per_s: got as f64 / secs,
        })
    }
}

fn partial_of(dest: &FsPath) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(PARTIAL_SUFFIX);
    PathBuf::from(s)
}

async fn wait_cancel(mut rx: tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

type TlsStream = tandem_pki::tokio_rustls::client::TlsStream<TcpStream>;

/// Connects to `host`'s image service at `address` and asks; returns the
/// stream positioned at the bytes and how many follow.
async fn ask(
    tls: &Arc<tandem_pki::rustls::ClientConfig>,
    host: &str,
    address: &str,
    what: &ServiceAsk,
) -> Result<(BufReader<TlsStream>, u64), String> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| format!("connecting to {host}'s image service at {address} timed out"))?
        .map_err(|e| format!("connecting to {host}'s image service at {address}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut stream, _peer) =
        tokio::time::timeout(CONNECT_TIMEOUT, tandem_pki::connect(tls.clone(), host, tcp))
            .await
            .map_err(|_| format!("TLS with {host} at {address} timed out"))?
            .map_err(|e| format!("TLS with {host} at {address}: {e}"))?;
    let mut line = serde_json::to_vec(what).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| format!("asking {host}: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("asking {host}: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut answer = Vec::new();
    let n = tokio::time::timeout(
        STALL_TIMEOUT,
        (&mut reader)
            .take(MAX_SERVICE_LINE as u64)
            .read_until(b'\n', &mut answer),
    )
    .await
    .map_err(|_| format!("{host} did not answer"))?
    .map_err(|e| format!("reading {host}'s answer: {e}"))?;
    if n == 0 || answer.last() != Some(&b'\n') {
        return Err(format!("{host} closed the connection without an answer"));
    }
    let answer: ServiceAnswer = serde_json::from_slice(&answer)
        .map_err(|e| format!("{host}'s image service answered garbage: {e}"))?;
    if let Some(e) = answer.error {
        return Err(format!("{host}: {e}"));
    }
    Ok((reader, answer.bytes))
}

/// Streams the image into `partial`, verifies, renames to `dest`.
async fn pull(
    tls: &Arc<tandem_pki::rustls::ClientConfig>,
    req: &CopyRequest,
    partial: &FsPath,
    dest: &FsPath,
    status: &Mutex<CopyStatus>,
) -> Result<(), String> {
    let (mut stream, len) = ask(
        tls,
        &req.from_host,
        &req.from_address,
        &ServiceAsk::Image {
            name: req.image.clone(),
        },
    )
    .await?;
    if len != req.bytes {
        return Err(format!(
            "{} has {len} bytes on {}, not the {} the deployment planned",
            req.image, req.from_host, req.bytes
        ));
    }
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(partial)
        .await
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < len {
        let want = CHUNK.min((len - got) as usize);
        let n = tokio::time::timeout(STALL_TIMEOUT, stream.read(&mut buf[..want]))
            .await
            .map_err(|_| {
                format!(
                    "nothing from {} for {} s",
                    req.from_host,
                    STALL_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("reading from {}: {e}", req.from_host))?;
        if n == 0 {
            return Err(format!(
                "{} closed the copy after {got} of {len} bytes",
                req.from_host
            ));
        }
        hash.update(&buf[..n]);
        file.write_all(&buf[..n])
            .await
            .map_err(|e| format!("writing {}: {e}", partial.display()))?;
        got += n as u64;
        status.lock().bytes_done = got;
    }
    file.sync_all()
        .await
        .map_err(|e| format!("fsync {}: {e}", partial.display()))?;
    drop(file);
    let sha = hex(hash.finish().as_ref());
    if !sha.eq_ignore_ascii_case(&req.sha256) {
        return Err(format!(
            "the copy's SHA-256 is {sha}, not {}: not kept",
            req.sha256
        ));
    }
    if dest.exists() {
        return Err(format!(
            "{} appeared meanwhile: not overwritten",
            dest.display()
        ));
    }
    tokio::fs::rename(partial, dest)
        .await
        .map_err(|e| format!("renaming into {}: {e}", dest.display()))?;
    if let Some(dir) = dest.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    // The copy is known good: cache its hash so that it serves as a source
    // without being read again.
    let _ = write_sha_cache(dest, &sha);
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha_cache_path(path: &FsPath) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.sha256"))
}

fn cache_key(meta: &std::fs::Metadata) -> String {
    format!("{} {} {}", meta.len(), meta.mtime(), meta.mtime_nsec())
}

fn write_sha_cache(path: &FsPath, sha: &str) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    std::fs::write(
        sha_cache_path(path),
        format!("{} {sha}\n", cache_key(&meta)),
    )
}

/// The file's SHA-256, from the cache beside it while its size and
/// modification time match, else read whole (and cached).
fn cached_sha256(path: &FsPath) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    let key = cache_key(&meta);
    if let Ok(c) = std::fs::read_to_string(sha_cache_path(path)) {
        if let Some(sha) = c.trim().strip_prefix(&key).map(str::trim) {
            if sha.len() == 64 {
                return Ok(sha.to_string());
            }
        }
    }
    let mut f = std::fs::File::open(path)?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let sha = hex(hash.finish().as_ref());
    let _ = std::fs::write(sha_cache_path(path), format!("{key} {sha}\n"));
    Ok(sha)
}

/// A reflink where the filesystem can, else a byte copy; through a
/// partial file either way.
fn local_copy(source: &FsPath, dest: &FsPath, free: u64) -> Result<(LocalCopyMethod, u64), String> {
    use std::os::fd::AsRawFd;
    let src = std::fs::File::open(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let len = src
        .metadata()
        .map_err(|e| format!("{}: {e}", source.display()))?
        .len();
    let partial = partial_of(dest);
    let out = std::fs::File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let result = (|| {
        // SAFETY: FICLONE takes the source descriptor as its argument; both
        // descriptors are open files owned by this function for the call.
        let cloned = unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0;
        let method = if cloned {
            LocalCopyMethod::Reflink
        } else {
            if len > free {
                return Err(format!(
                    "{} MiB free; a full copy needs {} MiB",
                    free >> 20,
                    len.div_ceil(1 << 20)
                ));
            }
            let mut r = std::io::BufReader::with_capacity(CHUNK, &src);
            let mut w = std::io::BufWriter::with_capacity(CHUNK, &out);
            std::io::copy(&mut r, &mut w).map_err(|e| format!("copying: {e}"))?;
            w.flush().map_err(|e| format!("copying: {e}"))?;
            LocalCopyMethod::Copy
        };
        out.sync_all().map_err(|e| format!("fsync: {e}"))?;
        std::fs::rename(&partial, dest).map_err(|e| format!("rename: {e}"))?;
        if let Some(dir) = dest.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(method)
    })();
    match result {
        Ok(m) => {
            if let Ok(sha) = cached_sha256(source) {
                let _ = write_sha_cache(dest, &sha);
            }
            Ok((m, len))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

pub fn router(deploy: Arc<Deploy>) -> Router {
    Router::new()
        .route("/v1/deploy/images/{name}", get(image))
        .route("/v1/deploy/copies", post(start_copy))
        .route(
            "/v1/deploy/copies/{id}",
            get(copy_status).delete(cancel_copy),
        )
        .route("/v1/deploy/local-copies", post(local_copy_route))
        .route("/v1/deploy/partials/{name}", delete(remove_partial))
        .route("/v1/deploy/probe", post(probe))
        .with_state(deploy)
}

async fn image(
    State(d): State<Arc<Deploy>>,
    Path(name): Path<String>,
) -> Result<Json<ImageInfo>, HttpError> {
    Ok(Json(d.image(&name).await?))
}

async fn start_copy(
    State(d): State<Arc<Deploy>>,
    Json(req): Json<CopyRequest>,
) -> Result<Json<CopyStatus>, HttpError> {
    Ok(Json(d.start_copy(req)?))
}

async fn copy_status(
    State(d): State<Arc<Deploy>>,
    Path(id): Path<String>,
) -> Result<Json<CopyStatus>, HttpError> {
    Ok(Json(d.copy_status(&id)?))
}

async fn cancel_copy(
    State(d): State<Arc<Deploy>>,
    Path(id): Path<String>,
) -> Result<Json<CopyStatus>, HttpError> {
    Ok(Json(d.cancel_copy(&id).await?))
}

async fn local_copy_route(
    State(d): State<Arc<Deploy>>,
    Json(req): Json<LocalCopyRequest>,
) -> Result<Json<LocalCopyDone>, HttpError> {
    Ok(Json(d.local_copy(req).await?))
}

async fn remove_partial(
    State(d): State<Arc<Deploy>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, HttpError> {
    d.remove_partial(&name).await?;
    Ok(Json(
        serde_json::json!({ "removed": format!("{name}{PARTIAL_SUFFIX}") }),
    ))
}

async fn probe(
    State(d): State<Arc<Deploy>>,
    Json(req): Json<ProbeRequest>,
) -> Result<Json<ProbeResult>, HttpError> {
    Ok(Json(d.probe(req).await?))
}

/// Serves the image directory to the cluster's hosts on `listener` until
/// `shutdown` completes.
pub async fn serve_images(
    listener: TcpListener,
    cluster: Arc<ClusterLink>,
    dir: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let dir = Arc::new(dir);
    crate::hostapi::accept_tls(
        "image service",
        listener,
        MAX_SERVICE_CONNECTIONS,
        move || cluster.image_service_server(),
        move |stream, peer, remote| {
            let dir = Arc::clone(&dir);
            async move {
                if let Err(e) = answer(stream, &dir).await {
                    debug!(%remote, peer = %peer.name, "image service: {e}");
                }
            }
        },
        shutdown,
    )
    .await;
}

async fn answer<S>(stream: S, dir: &FsPath) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    tokio::time::timeout(
        STALL_TIMEOUT,
        (&mut reader)
            .take(MAX_SERVICE_LINE as u64)
            .read_until(b'\n', &mut line),
    )
    .await
    .map_err(|_| std::io::Error::other("no request"))??;
    let mut stream = reader.into_inner();
    let refuse = |e: String| ServiceAnswer {
        bytes: 0,
        error: Some(e),
    };
    let ask: Result<ServiceAsk, String> = if line.last() == Some(&b'\n') {
        serde_json::from_slice(&line).map_err(|e| format!("a malformed request: {e}"))
    } else {
        Err("a request is one line of at most 4 KiB".into())
    };
    let send_line = |a: &ServiceAnswer| {
        let mut l = serde_json::to_vec(a).unwrap_or_default();
        l.push(b'\n');
        l
    };
    match ask {
        Err(e) => stream.write_all(&send_line(&refuse(e))).await?,
        Ok(ServiceAsk::Probe { bytes }) => {
            if bytes == 0 || bytes > MAX_PROBE_BYTES {
                let e = format!("a probe moves 1 byte to {} MiB", MAX_PROBE_BYTES >> 20);
                stream.write_all(&send_line(&refuse(e))).await?;
            } else {
                stream
                    .write_all(&send_line(&ServiceAnswer { bytes, error: None }))
                    .await?;
                // Incompressible filler, so that no layer makes a probe
                // look faster than an image would go.
                let mut buf = vec![0u8; CHUNK];
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                for chunk in buf.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = x.to_le_bytes();
                    chunk.copy_from_slice(&b[..chunk.len()]);
                }
                let mut left = bytes;
                while left > 0 {
                    let n = (left as usize).min(CHUNK);
                    stream.write_all(&buf[..n]).await?;
                    left -= n as u64;
                }
            }
        }
        Ok(ServiceAsk::Image { name }) => {
            let opened = match valid_image_name(&name) {
                Err(e) => Err(e),
                Ok(()) => tokio::fs::File::open(dir.join(&name))
                    .await
                    .map_err(|e| format!("{name}: {e}")),
            };
            let opened = match opened {
                Ok(f) => match f.metadata().await {
                    Ok(m) if m.is_file() => Ok((f, m.len())),
                    Ok(_) => Err(format!("{name} is not a file")),
                    Err(e) => Err(format!("{name}: {e}")),
                },
                Err(e) => Err(e),
            };
            match opened {
                Err(e) => stream.write_all(&send_line(&refuse(e))).await?,
                Ok((mut f, len)) => {
                    stream
                        .write_all(&send_line(&ServiceAnswer {
                            bytes: len,
                            error: None,
                        }))
                        .await?;
                    let mut buf = vec![0u8; CHUNK];
                    let mut left = len;
                    while left > 0 {
                        let want = (left as usize).min(CHUNK);
                        let n = f.read(&mut buf[..want]).await?;
                        if n == 0 {
                            // Shrunk while served: the receiver's length
                            // and hash checks refuse the copy.
                            break;
                        }
                        stream.write_all(&buf[..n]).await?;
                        left -= n as u64;
                    }
                }
            }
        }
    }
    stream.flush().await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_copy_is_whole_and_leaves_no_partial() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.img");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let dest = dir.path().join("b.img");
        let (_, n) = local_copy(&src, &dest, u64::MAX).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        assert!(!partial_of(&dest).exists());
        assert_eq!(cached_sha256(&dest).unwrap(), cached_sha256(&src).unwrap());
    }

    #[test]
    fn a_full_copy_without_room_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.img");
        std::fs::write(&src, vec![1u8; 4096]).unwrap();
        let dest = dir.path().join("b.img");
        match local_copy(&src, &dest, 10) {
            // A reflinking filesystem needs no room.
            Ok((LocalCopyMethod::Reflink, _)) => {}
            Ok(other) => panic!("copied without room: {other:?}"),
            Err(e) => {
                assert!(e.contains("free"), "{e}");
                assert!(!dest.exists() && !partial_of(&dest).exists());
            }
        }
    }

    #[test]
    fn the_hash_cache_follows_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.img");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            cached_sha256(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // A rewrite of another length is hashed anew.
        std::fs::write(&p, b"abcd").unwrap();
        assert_eq!(
            cached_sha256(&p).unwrap(),
            "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
        );
    }

    #[tokio::test]
    async fn the_service_refuses_names_outside_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        for ask in [
            r#"{"ask":"image","name":"../etc/passwd"}"#,
            r#"{"ask":"image","name":"missing.img"}"#,
            r#"{"ask":"probe","bytes":0}"#,
            "garbage",
        ] {
            let (client, server) = tokio::io::duplex(1 << 16);
            let (mut cr, mut cw) = tokio::io::split(client);
            cw.write_all(format!("{ask}\n").as_bytes()).await.unwrap();
            answer(server, dir.path()).await.unwrap();
            let mut out = String::new();
            cr.read_to_string(&mut out).await.unwrap();
            let a: ServiceAnswer = serde_json::from_str(out.trim()).unwrap();
            assert!(a.error.is_some() && a.bytes == 0, "{ask}: {out}");
        }
    }
}
