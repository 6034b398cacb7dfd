//! The NBD server: one export backed by a regular file, every write also
//! recorded in the export's current [`WriteLog`].
//!
//! Each connection has a reader loop that frames requests and spawns one
//! task per served request, so QEMU's pipelined requests run concurrently;
//! replies go out in completion order, as NBD allows. A byte budget bounds
//! the payload memory held by requests in flight.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Mutex as AsyncMutex, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::client::{ClientFault, ClientToken, Clients};
use crate::pending::{LogOverflow, PendingLog, DEFAULT_LOG_CAP};
use crate::proto::{self, ClientFlags, Command, OptionHeader, OptionOutcome, Request, Verdict};
use crate::writelog::{DiskWrite, WriteLog};
use crate::zero::zero_range;
use crate::NbdError;

/// The export name used by [`Export::new`].
pub const DEFAULT_EXPORT_NAME: &str = "disk";

/// A client that has not finished haggling by then is dropped, so a stuck
/// or idle peer cannot hold a task forever.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Options allowed before GO; honest clients send a handful.
const MAX_OPTIONS: u32 = 1024;
/// Payload bytes (reads and writes) a connection may hold in flight, in
/// KiB units as semaphore permits. Twice the largest request, so one
/// maximal request never waits for itself.
const INFLIGHT_BUDGET_KIB: u32 = 64 * 1024;
/// How long shutdown waits for connections to finish in-flight requests
/// before abandoning them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Counters {
    commands: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    zero_writes: AtomicU64,
    flushes: AtomicU64,
    error_replies: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    bytes_zeroed: AtomicU64,
    connections_total: AtomicU64,
    connections_active: AtomicU64,
    protocol_errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A snapshot of an export's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Requests received in the transmission phase, of any type.
    pub commands: u64,
    pub reads: u64,
    /// Successful NBD_CMD_WRITEs.
    pub writes: u64,
    /// Successful NBD_CMD_WRITE_ZEROES and NBD_CMD_TRIMs.
    pub zero_writes: u64,
    pub flushes: u64,
    /// Requests answered with a non-zero error.
    pub error_replies: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub connections_total: u64,
    pub connections_active: u64,
    /// Connections dropped for breaking the protocol.
    pub protocol_errors: u64,
}

/// One NBD export: the backing file and the writes recorded since the
/// last [`take_writes`](Self::take_writes).
pub struct Export {
    name: String,
    size: u64,
    path: PathBuf,
    file: File,
    /// Held across each write to the file *and* its append to the log, so
    /// the log's order is the order the file saw, and a take always cuts
    /// between two whole writes: file state at the take = state at the
    /// previous take + the returned log, even with concurrent writers.
    /// Bounded in bytes: see [`set_log_cap`](Self::set_log_cap).
    log: Mutex<PendingLog>,
    /// The client the owner watches (see [`expect_client`](Self::expect_client)).
    clients: Mutex<Clients>,
    counters: Counters,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Opens (or creates, sparse) the backing file at `path` for an export
    /// of `size` bytes named [`DEFAULT_EXPORT_NAME`].
    pub fn new(path: impl AsRef<Path>, size: u64) -> Result<Arc<Export>, NbdError> {
        Self::with_name(DEFAULT_EXPORT_NAME, path, size)
    }

    /// Like [`new`](Self::new) with an explicit export name. Clients may
    /// also reach the export by the empty (default) name.
    ///
    /// An existing file must be empty or exactly `size` bytes: silently
    /// resizing a disk image that already holds data would corrupt it.
    pub fn with_name(
        name: impl Into<String>,
        path: impl AsRef<Path>,
        size: u64,
    ) -> Result<Arc<Export>, NbdError> {
        let name = name.into();
        let path = path.as_ref().to_path_buf();
        if i64::try_from(size).is_err() {
            return Err(NbdError::TooLarge(size));
        }
        if name.len() > proto::MAX_NAME_LEN {
            return Err(NbdError::Config(format!(
                "export name of {} bytes exceeds {}",
                name.len(),
                proto::MAX_NAME_LEN
            )));
        }
        let io_err = |what: &str, e| NbdError::io(format!("{what} {}", path.display()), e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err("opening", e))?;
        let meta = file.metadata().map_err(|e| io_err("stat of", e))?;
        if !meta.is_file() {
            return Err(NbdError::Config(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        match meta.len() {
            n if n == size => {}
            0 => file.set_len(size).map_err(|e| io_err("sizing", e))?,
            actual => {
                return Err(NbdError::SizeMismatch {
                    path,
                    actual,
                    expected: size,
                })
            }
        }
        info!(name, size, path = %path.display(), "NBD export ready");
        Ok(Arc::new(Export {
            name,
            size,
            path,
            file,
            log: Mutex::new(PendingLog::new(DEFAULT_LOG_CAP)),
            clients: Mutex::new(Clients::default()),
            counters: Counters::default(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn log(&self) -> MutexGuard<'_, PendingLog> {
        // A lock that cannot be poisoned: nothing panics while holding it,
        // and if something ever did, the log is still a valid prefix of
        // what the file saw.
        self.log.lock()
    }

    /// Returns every write recorded since the previous call and starts a
    /// new, empty log. Call it at the epoch boundary, with the VM stopped
    /// (and so its block layer drained): every write QEMU has completed is
    /// then in the returned log.
    ///
    /// `Err` when the writes since the previous call passed the log's cap
    /// and were dropped: the caller must then resend the whole backing
    /// file, read *after* this call (it holds every dropped write; writes
    /// racing with the read are in the next log).
    pub fn take_writes(&self) -> Result<WriteLog, LogOverflow> {
        self.log().take()
    }

    /// Number of writes and payload bytes recorded since the last take
    /// (0, 0 once the log has overflowed).
    pub fn pending(&self) -> (usize, u64) {
        self.log().pending()
    }

    /// Whether the log has passed its cap since the last take, and by what.
    pub fn overflow(&self) -> Option<LogOverflow> {
        self.log().overflow()
    }

    /// The log's cap in bytes: payload plus a record's bookkeeping per
    /// write ([`DEFAULT_LOG_CAP`] unless set). Past it the log is dropped
    /// and the next [`take_writes`](Self::take_writes) reports the
    /// overflow, so memory stays bounded however long nobody takes.
    pub fn log_cap(&self) -> u64 {
        self.log().cap()
    }

    /// Sets the log's cap; a log already past it overflows at once.
    pub fn set_log_cap(&self, bytes: u64) {
        let dropped = self.log().set_cap(bytes);
        drop(dropped);
    }

    /// Starts watching for the client the owner is about to connect: the
    /// next connection to reach the transmission phase. See
    /// [`client_check`](Self::client_check).
    pub fn expect_client(&self) -> ClientToken {
        self.clients.lock().expect()
    }

    /// Whether the client `token` names is attached and every write it
    /// sent was applied and logged: `Err` from its first refused write,
    /// its disconnection, or a second client attaching, for good. No I/O;
    /// a lock and a comparison.
    pub fn client_check(&self, token: ClientToken) -> Result<(), ClientFault> {
        self.clients.lock().check(token)
    }

    pub fn stats(&self) -> ExportStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportStats {
            commands: g(&c.commands),
            reads: g(&c.reads),
            writes: g(&c.writes),
            zero_writes: g(&c.zero_writes),
            flushes: g(&c.flushes),
            error_replies: g(&c.error_replies),
            bytes_read: g(&c.bytes_read),
            bytes_written: g(&c.bytes_written),
            bytes_zeroed: g(&c.bytes_zeroed),
            connections_total: g(&c.connections_total),
            connections_active: g(&c.connections_active),
            protocol_errors: g(&c.protocol_errors),
        }
    }

    fn info(&self) -> proto::ExportInfo<'_> {
        proto::ExportInfo {
            name: &self.name,
            size: self.size,
            flags: proto::TRANSMISSION_FLAGS,
        }
    }

    fn write_data(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        let dropped = {
            let mut log = self.log();
            self.file.write_all_at(&data, offset)?;
            log.push(DiskWrite::Data { offset, data })
        };
        // An overflowed log is freed here, outside the lock.
        drop(dropped);
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool, fua: bool) -> io::Result<()> {
        let dropped = {
            let mut log = self.log();
            zero_range(&self.file, offset, len, may_punch)?;
            log.push(DiskWrite::Zero { offset, len })
        };
        drop(dropped);
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// Maps a file error to the closest NBD error value (spec: "Error values").
fn nbd_errno(e: &io::Error) -> u32 {
    use nix::errno::Errno;
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG) => proto::ENOSPC,
        Some(Errno::EPERM | Errno::EACCES | Errno::EROFS) => proto::EPERM,
        Some(Errno::ENOMEM) => proto::ENOMEM,
        Some(Errno::EINVAL) => proto::EINVAL,
        _ => proto::EIO,
    }
}

/// A running server. Dropping it asks the server to stop without waiting.
pub struct ServerHandle {
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    socket_path: Option<PathBuf>,
    local_addr: Option<SocketAddr>,
}

impl ServerHandle {
    /// The unix socket served, for [`serve_unix`].
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket_path.as_deref()
    }

    /// The bound address, for [`serve_tcp`] (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Asks the server to stop: no new connections; open ones finish the
    /// requests they have read and close.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits for the server to stop (after [`shutdown`](Self::shutdown)).
    pub async fn join(mut self) -> Result<(), NbdError> {
        match self.task.take() {
            Some(t) => t.await.map_err(|e| NbdError::Task(e.to_string())),
            None => Ok(()),
        }
    }

    /// [`shutdown`](Self::shutdown) then [`join`](Self::join).
    pub async fn stop(self) -> Result<(), NbdError> {
        self.shutdown();
        self.join().await
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// Serves `export` on a unix socket at `socket_path`. A stale socket file
/// left by a previous run is replaced; any other existing file is an error.
/// Must be called within a tokio runtime.
pub fn serve_unix(
    export: Arc<Export>,
    socket_path: impl AsRef<Path>,
) -> Result<ServerHandle, NbdError> {
    let path = socket_path.as_ref().to_path_buf();
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&path)
            .map_err(|e| NbdError::io(format!("removing stale {}", path.display()), e))?,
        Ok(_) => {
            return Err(NbdError::Config(format!(
                "{} exists and is not a socket",
                path.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(NbdError::io(format!("stat of {}", path.display()), e)),
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| NbdError::io(format!("binding {}", path.display()), e))?;
    info!(export = export.name(), socket = %path.display(), "NBD server listening");
    Ok(spawn_server(
        export,
        Listener::Unix(listener, path.clone()),
        Some(path),
        None,
    ))
}

/// Serves `export` over TCP on `addr` (port 0 picks a free port; see
/// [`ServerHandle::local_addr`]). There is no TLS or authentication: bind
/// only to addresses the replication network trusts.
pub async fn serve_tcp(export: Arc<Export>, addr: SocketAddr) -> Result<ServerHandle, NbdError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| NbdError::io(format!("binding {addr}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| NbdError::io("reading bound address", e))?;
    info!(export = export.name(), %local, "NBD server listening");
    Ok(spawn_server(
        export,
        Listener::Tcp(listener),
        None,
        Some(local),
    ))
}

fn spawn_server(
    export: Arc<Export>,
    listener: Listener,
    socket_path: Option<PathBuf>,
    local_addr: Option<SocketAddr>,
) -> ServerHandle {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(export, listener, rx));
    ServerHandle {
        shutdown: tx,
        task: Some(task),
        socket_path,
        local_addr,
    }
}

/// Resolves once shutdown is requested or the handle is gone.
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn accept_loop(export: Arc<Export>, listener: Listener, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown_requested(&mut stop) => break,
            Some(res) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = res {
                    error!(error = %e, "NBD connection task failed");
                }
            }
            accepted = accept(&listener) => match accepted {
                Ok(Accepted::Unix(s)) => {
                    conns.spawn(run_connection(export.clone(), s, stop.clone(), "unix".into()));
                }
                Ok(Accepted::Tcp(s, peer)) => {
                    // Replies are small and latency-bound (guest writes wait
                    // on them); Nagle would only add delay.
                    let _ = s.set_nodelay(true);
                    conns.spawn(run_connection(export.clone(), s, stop.clone(), peer.to_string()));
                }
                Err(e) => {
                    // Typically EMFILE; back off rather than spin.
                    warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("NBD connections still busy after the grace period; aborting them");
        conns.shutdown().await;
    }
    info!(export = export.name(), "NBD server stopped");
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, SocketAddr),
}

async fn accept(l: &Listener) -> io::Result<Accepted> {
    match l {
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
    }
}

/// Serves one already-connected client until it disconnects, from the
/// greeting onwards. For transports the built-in listeners do not cover
/// (and for tests); there is no shutdown other than the client leaving.
pub async fn serve_stream<S>(export: Arc<Export>, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (_keep, rx) = watch::channel(false);
    run_connection(export, stream, rx, "stream".into()).await;
}

/// Keeps the active-connection gauge right however the connection ends.
struct ActiveGuard(Arc<Export>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0
            .counters
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

type Writer<S> = Arc<AsyncMutex<BufWriter<tokio::io::WriteHalf<S>>>>;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// Client sent NBD_OPT_ABORT or NBD_CMD_DISC, or closed between messages.
    Clean,
    Shutdown,
    Io(io::Error),
    Protocol(String),
}

async fn run_connection<S>(
    export: Arc<Export>,
    stream: S,
    mut stop: watch::Receiver<bool>,
    peer: String,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // Connections are numbered from 1 in the order they arrive.
    let conn = export
        .counters
        .connections_total
        .fetch_add(1, Ordering::Relaxed)
        + 1;
    bump(&export.counters.connections_active, 1);
    let _active = ActiveGuard(export.clone());
    debug!(%peer, conn, "NBD client connected");

    let (r, w) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let w: Writer<S> = Arc::new(AsyncMutex::new(BufWriter::with_capacity(64 * 1024, w)));

    let negotiated = tokio::select! {
        biased;
        _ = shutdown_requested(&mut stop) => Err(End::Shutdown),
        res = tokio::time::timeout(NEGOTIATION_TIMEOUT, negotiate(&export, conn, &mut r, &w)) => {
            match res {
                Ok(r) => r,
                Err(_) => Err(End::Protocol("negotiation timed out".into())),
            }
        }
    };
    let end = match negotiated {
        Ok(()) => transmission(&export, conn, &mut r, &w, &mut stop).await,
        Err(end) => end,
    };
    // Every request the connection read has been served (transmission
    // drains them): if it was the watched client, its log is whole up to
    // here and nothing it sends can be logged any more.
    export.clients.lock().detached(conn, || end.describe());
    match &end {
        End::Clean => debug!(%peer, "NBD client disconnected"),
        End::Shutdown => debug!(%peer, "NBD connection closed for shutdown"),
        End::Io(e) => debug!(%peer, error = %e, "NBD connection lost"),
        End::Protocol(why) => {
            bump(&export.counters.protocol_errors, 1);
            warn!(%peer, why, "NBD client broke the protocol; disconnecting");
        }
    }
    let mut w = w.lock().await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::Clean => "the client disconnected".into(),
            End::Shutdown => "the server is shutting down".into(),
            End::Io(e) => format!("connection lost: {e}"),
            End::Protocol(why) => format!("the client broke the protocol: {why}"),
        }
    }
}

/// The name of an NBD error value, for messages.
fn errno_name(e: u32) -> &'static str {
    match e {
        proto::EPERM => "EPERM",
        proto::EIO => "EIO",
        proto::ENOMEM => "ENOMEM",
        proto::EINVAL => "EINVAL",
        proto::ENOSPC => "ENOSPC",
        proto::EOVERFLOW => "EOVERFLOW",
        proto::ENOTSUP => "ENOTSUP",
        proto::ESHUTDOWN => "ESHUTDOWN",
        _ => "error",
    }
}

/// Whether a failed `command` means a write the client made may be
/// missing from the export (and so from its log).
fn is_write(command: Command) -> bool {
    matches!(
        command,
        Command::Write | Command::WriteZeroes | Command::Trim | Command::Flush
    )
}

/// Records a refused write-type request against the watched client.
fn note_refusal(export: &Export, conn: u64, req: &Request, err: u32, detail: &str) {
    if is_write(req.command) {
        export.clients.lock().refused(conn, || {
            format!(
                "{:?} of {} bytes at offset {}: {}{detail}",
                req.command,
                req.length,
                req.offset,
                errno_name(err)
            )
        });
    }
}

/// Maps a read failure between messages: EOF there is a client leaving.
fn read_end(e: io::Error) -> End {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        End::Clean
    } else {
        End::Io(e)
    }
}

async fn send<S: AsyncWrite>(w: &Writer<S>, parts: &[&[u8]]) -> io::Result<()> {
    let mut w = w.lock().await;
    for p in parts {
        w.write_all(p).await?;
    }
    w.flush().await
}

/// Fixed-newstyle handshake and option haggling, up to the transmission
/// phase. `Err` ends the connection.
async fn negotiate<R, S>(export: &Export, conn: u64, r: &mut R, w: &Writer<S>) -> Result<(), End>
where
    R: AsyncRead + Unpin,
    S: AsyncWrite,
{
    send(w, &[&proto::server_greeting()])
        .await
        .map_err(End::Io)?;
    let mut raw = [0u8; 4];
    r.read_exact(&mut raw).await.map_err(read_end)?;
    let client = ClientFlags::parse(raw).map_err(|e| End::Protocol(e.to_string()))?;
    let info = export.info();
    let mut out = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        r.read_exact(&mut hdr).await.map_err(read_end)?;
        let h = OptionHeader::parse(&hdr).map_err(|e| End::Protocol(e.to_string()))?;
        let mut data = vec![0u8; h.len as usize];
        r.read_exact(&mut data).await.map_err(End::Io)?;
        out.clear();
        let outcome = proto::handle_option(h.option, &data, &info, client, &mut out);
        debug!(option = h.option, len = h.len, ?outcome, "NBD option");
        if outcome == OptionOutcome::Transmission {
            // Attached before the client can read the reply, so an owner
            // that connected it sees the attachment as soon as the client
            // does.
            export.clients.lock().attached(conn);
        }
        if !out.is_empty() {
            send(w, &[&out]).await.map_err(End::Io)?;
        }
        match outcome {
            OptionOutcome::Continue => {}
            OptionOutcome::Transmission => return Ok(()),
            OptionOutcome::Abort => return Err(End::Clean),
            OptionOutcome::Reject(why) => return Err(End::Protocol(why.into())),
        }
    }
    Err(End::Protocol(format!("more than {MAX_OPTIONS} options")))
}

/// What the reader hands a request task.
enum Work {
    Read,
    Write(Vec<u8>),
    Zero { may_punch: bool },
    Flush,
    Cache,
}

async fn transmission<R, S>(
    export: &Arc<Export>,
    conn: u64,
    r: &mut R,
    w: &Writer<S>,
    stop: &mut watch::Receiver<bool>,
) -> End
where
    R: AsyncRead + Unpin,
    S: AsyncWrite + Send + 'static,
{
    let budget = Arc::new(Semaphore::new(INFLIGHT_BUDGET_KIB as usize));
    let mut tasks = JoinSet::new();
    let end = loop {
        while let Some(res) = tasks.try_join_next() {
            if let Err(e) = res {
                error!(error = %e, "NBD request task failed");
            }
        }
        let mut hdr = [0u8; proto::REQUEST_LEN];
        tokio::select! {
            biased;
            _ = shutdown_requested(stop) => break End::Shutdown,
            res = r.read_exact(&mut hdr) => if let Err(e) = res { break read_end(e) },
        }
        let req = match Request::parse(&hdr) {
            Ok(req) => req,
            Err(e) => break End::Protocol(e.to_string()),
        };
        bump(&export.counters.commands, 1);
        match proto::check_request(&req, export.size, proto::TRANSMISSION_FLAGS) {
            Verdict::Disconnect => break End::Clean,
            Verdict::Fail(err) => {
                debug!(?req, err, "NBD request refused");
                // The payload of a refused WRITE is read and thrown away in
                // bounded chunks (no allocation of the claimed size), which
                // keeps the stream framed and the connection, and so QEMU's
                // mirror job, alive; an honest client never sends one.
                let n = u64::from(req.payload_len());
                if n > 0 {
                    let mut sink = tokio::io::sink();
                    match tokio::io::copy(&mut (&mut *r).take(n), &mut sink).await {
                        Ok(got) if got == n => {}
                        Ok(_) => break End::Io(io::ErrorKind::UnexpectedEof.into()),
                        Err(e) => break End::Io(e),
                    }
                }
                bump(&export.counters.error_replies, 1);
                note_refusal(export, conn, &req, err, " (refused)");
                let reply = proto::SimpleReply {
                    error: err,
                    cookie: req.cookie,
                };
                if let Err(e) = send(w, &[&reply.encode()]).await {
                    break End::Io(e);
                }
                continue;
            }
            Verdict::Serve => {}
        }
        let cost = match req.command {
            Command::Read | Command::Write => req.length.div_ceil(1024).max(1),
            _ => 1,
        };
        let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
            break End::Protocol("in-flight budget closed".into());
        };
        let work = match req.command {
            Command::Read => Work::Read,
            Command::Write => {
                let mut data = vec![0u8; req.length as usize];
                // EOF inside a payload is a client that died mid-command:
                // the write was never whole, so it is neither applied nor
                // logged.
                if let Err(e) = r.read_exact(&mut data).await {
                    break End::Io(e);
                }
                Work::Write(data)
            }
            Command::WriteZeroes => Work::Zero {
                may_punch: req.flags & proto::CMD_FLAG_NO_HOLE == 0,
            },
            // Discarding is a hint NBD lets us ignore, but the replica must
            // match the primary's target byte for byte whatever the guest
            // reads there later, so a TRIM is made a zero write: the two
            // sides then agree (zeroes) without depending on either file
            // system's hole semantics.
            Command::Trim => Work::Zero { may_punch: true },
            Command::Flush => Work::Flush,
            Command::Cache => Work::Cache,
            Command::Disc | Command::BlockStatus | Command::Unknown(_) => {
                // check_request never serves these.
                continue;
            }
        };
        let export = export.clone();
        let w = w.clone();
        tasks.spawn(async move {
            let _permit = permit;
            serve_request(export, conn, w, req, work).await;
        });
    };
    // NBD_CMD_DISC requires finishing outstanding requests; on any other
    // end their effects (file + log) must still be whole, so always drain.
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            error!(error = %e, "NBD request task failed");
        }
    }
    end
}

async fn serve_request<S>(export: Arc<Export>, conn: u64, w: Writer<S>, req: Request, work: Work)
where
    S: AsyncWrite + Send + 'static,
{
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.length);
    let ex = export.clone();
    let done = tokio::task::spawn_blocking(move || -> io::Result<Option<Vec<u8>>> {
        let c = &ex.counters;
        match work {
            Work::Read => {
                let data = ex.read(offset, len)?;
                bump(&c.reads, 1);
                bump(&c.bytes_read, u64::from(len));
                Ok(Some(data))
            }
            Work::Write(data) => {
                ex.write_data(offset, data, fua)?;
                bump(&c.writes, 1);
                bump(&c.bytes_written, u64::from(len));
                Ok(None)
            }
            Work::Zero { may_punch } => {
                ex.write_zeroes(offset, u64::from(len), may_punch, fua)?;
                bump(&c.zero_writes, 1);
                bump(&c.bytes_zeroed, u64::from(len));
                Ok(None)
            }
            Work::Flush => {
                ex.file.sync_data()?;
                bump(&c.flushes, 1);
                Ok(None)
            }
            Work::Cache => Ok(None),
        }
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(format!("I/O task failed: {e}"))));
    let (error, data) = match done {
        Ok(data) => (0, data),
        Err(e) => {
            error!(?req, error = %e, path = %export.path.display(), "NBD backing file I/O failed");
            bump(&export.counters.error_replies, 1);
            let err = nbd_errno(&e);
            note_refusal(&export, conn, &req, err, &format!(" ({e})"));
            (err, None)
        }
    };
    let reply = proto::SimpleReply {
        error,
        cookie: req.cookie,
    }
    .encode();
    let sent = match &data {
        Some(d) => send(&w, &[&reply, d]).await,
        None => send(&w, &[&reply]).await,
    };
    if let Err(e) = sent {
        // The client is gone; the reader will notice and end the
        // connection. The write itself, if any, is already applied and
        // logged, consistently.
        debug!(?req, error = %e, "NBD reply not delivered");
    }
}
