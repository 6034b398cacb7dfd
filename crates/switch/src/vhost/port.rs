//! Port lifecycle: a listening socket and a thread serving one frontend
//! at a time, each with a fresh vhost-user daemon.

use std::fmt;
use std::io;
use std::net::Shutdown;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::backend::{Conn, NetBackend, PortIo};
use super::relay::start_shims;
use super::{
    lock, ConnectHook, Mem, ANNOUNCE_AFTER_PAUSE, EGRESS_EVENT, THROTTLE_EVENT, TX_MORE_EVENT,
};
use crate::port::{EgressQueue, Ingress, PortCounters, PortId};
use tandem_dirty::PageLog;

/// How often a port without frontend drops what was queued for it.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How long [`VmPortHandle::shutdown`] waits for the port's thread.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Settings of a VM port.
#[derive(Debug, Clone)]
pub struct VmPortConfig {
    pub id: PortId,
    /// Where QEMU connects; created (replacing a stale file) by the port.
    pub socket: PathBuf,
    /// For logs.
    pub name: String,
}

struct Shared {
    stop: AtomicBool,
    connections: AtomicU64,
    current: Mutex<Option<Arc<Conn>>>,
    shutdown: Mutex<Option<ShutdownHandle>>,
}

/// A running VM port. Dropping it stops it like [`VmPortHandle::shutdown`].
pub struct VmPortHandle {
    io: Arc<PortIo>,
    shared: Arc<Shared>,
    socket: PathBuf,
    name: String,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for VmPortHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmPortHandle")
            .field("name", &self.name)
            .field("socket", &self.socket)
            .field("connected", &self.is_connected())
            .field("connections", &self.connections())
            .finish()
    }
}

impl VmPortHandle {
    /// Starts serving `cfg.socket` in background threads. Frames the guest
    /// transmits (virtio-net header stripped) go to
    /// `ingress.ingress(cfg.id, frame)`; frames in `egress` are written into
    /// the guest's RX buffers. After QEMU disconnects it listens again on
    /// the same socket for the next QEMU, without affecting other ports.
    pub fn spawn(
        cfg: VmPortConfig,
        egress: Arc<EgressQueue>,
        counters: Arc<PortCounters>,
        ingress: Arc<dyn Ingress>,
    ) -> io::Result<VmPortHandle> {
        Self::spawn_with_hook(cfg, egress, counters, ingress, None)
    }

    /// [`spawn`](Self::spawn), plus a hook run (in the port's worker
    /// thread, so it must not block) each time a guest's rings start on
    /// the port: when a frontend attached and its guest driver is up, and
    /// again after a guest reboot or an incoming migration. It stands in
    /// for `VHOST_USER_SEND_RARP`, which the `vhost` crate cannot deliver.
    pub fn spawn_with_hook(
        cfg: VmPortConfig,
        egress: Arc<EgressQueue>,
        counters: Arc<PortCounters>,
        ingress: Arc<dyn Ingress>,
        on_connect: Option<ConnectHook>,
    ) -> io::Result<VmPortHandle> {
        let socket = SocketFile::bind(&cfg.socket).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("listening on {}: {e}", cfg.socket.display()),
            )
        })?;
        let io = Arc::new(PortIo::new(
            cfg.id,
            cfg.name.clone(),
            egress,
            counters,
            ingress,
            on_connect,
        )?);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            current: Mutex::new(None),
            shutdown: Mutex::new(None),
        });
        let thread = {
            let shared = shared.clone();
            let io = io.clone();
            std::thread::Builder::new()
                .name(format!("vhost-{}", cfg.name))
                .spawn(move || serve(io, shared, socket))?
        };
        info!(port = %cfg.name, socket = %cfg.socket.display(), "vhost-user port listening");
        Ok(VmPortHandle {
            io,
            shared,
            socket: cfg.socket,
            name: cfg.name,
            thread: Some(thread),
        })
    }

    /// A frontend is attached and its rings run (or stopped only briefly,
    /// as they do for every checkpoint).
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.current).as_ref().is_some_and(|c| {
            // A checkpoint stops the rings for a few milliseconds each
            // epoch; the port stays up through that.
            c.rings_running()
                || (c.started_once.load(Ordering::Acquire)
                    && lock(&c.stopped_at).is_some_and(|t| t.elapsed() < ANNOUNCE_AFTER_PAUSE))
        })
    }

    /// Wakes the port's worker to serve both rings now. The switch's
    /// housekeeping calls it periodically: a kick or interrupt lost around
    /// a ring restart (every checkpoint restarts the rings) then costs a
    /// short delay instead of a stalled guest.
    pub fn poke(&self) {
        if let Some(c) = lock(&self.shared.current).as_ref() {
            let _ = c.io.egress.notifier().write(1);
        }
    }

    /// Records every write this port makes into guest RAM in `log` (as
    /// pages of the RAM file), or stops recording. Takes effect at the next
    /// ring service; replication installs it before its first checkpoint.
    pub fn set_write_log(&self, log: Option<Arc<PageLog>>) {
        *lock(&self.io.write_log) = log;
    }

    /// Keeps (or stops keeping) what is queued for the guest while its
    /// rings are stopped: a migrating VM's switchover.
    pub fn hold_egress(&self, on: bool) {
        self.io
            .hold_egress
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// How many frontends have attached so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Stops serving: the frontend (if any) is disconnected, the socket file
    /// removed and the threads joined (waiting at most a few seconds).
    pub fn shutdown(self) {
        drop(self)
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = lock(&self.shared.shutdown).take() {
            h.shutdown();
        }
        // Wakes an accept that is waiting for a connection.
        let _ = UnixStream::connect(&self.socket);
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            if thread.join().is_err() {
                error!(port = %self.name, "vhost-user port thread panicked");
            }
        } else {
            warn!(port = %self.name, "vhost-user port thread did not stop in time; leaving it");
            let _ = std::fs::remove_file(&self.socket);
        }
        info!(port = %self.name, "vhost-user port stopped");
    }
}

impl Drop for VmPortHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The listening socket; its file is removed when it is dropped.
struct SocketFile {
    listener: UnixListener,
    path: PathBuf,
}

impl SocketFile {
    fn bind(path: &Path) -> io::Result<Self> {
        // A stale socket from an earlier run would make bind fail.
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The port's thread: waits for a frontend, serves it until it goes away,
/// and starts over.
fn serve(io: Arc<PortIo>, shared: Arc<Shared>, socket: SocketFile) {
    let epoll = match Epoll::new().and_then(|ep| {
        ep.ctl(
            ControlOperation::Add,
            socket.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .map(|()| ep)
    }) {
        Ok(ep) => ep,
        Err(e) => {
            error!(port = %io.name, error = %e, "cannot wait for frontends; port is dead");
            return;
        }
    };
    let mut events = [EpollEvent::default(); 1];
    while !shared.stop.load(Ordering::Acquire) {
        match epoll.wait(IDLE_POLL.as_millis() as i32, &mut events) {
            Ok(0) => {
                // No frontend: what was queued for the guest is stale.
                io.drop_egress();
                continue;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!(port = %io.name, error = %e, "waiting for a frontend");
                std::thread::sleep(IDLE_POLL);
                continue;
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        match socket.listener.accept() {
            Ok((frontend, _)) => serve_one(&io, &shared, frontend),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!(port = %io.name, error = %e, "accepting a frontend failed");
                std::thread::sleep(IDLE_POLL);
            }
        }
    }
    // Dropping `socket` removes the socket file.
}

/// A connected pair between the shim and the daemon. The daemon can only
/// take connections from a listener, so one is made for the moment in a
/// directory only this process can enter, and removed right away.
fn daemon_channel() -> io::Result<(Listener, UnixStream, PathBuf)> {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::os::unix::fs::DirBuilderExt;

    let nonce = RandomState::new().build_hasher().finish();
    let dir =
        std::env::temp_dir().join(format!("tandem-vhost-{}-{nonce:016x}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("backend.sock");
    let made = UnixListener::bind(&path).and_then(|l| Ok((l, UnixStream::connect(&path)?)));
    let _ = std::fs::remove_file(&path);
    match made {
        Ok((l, c)) => Ok((Listener::from(l), c, dir)),
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            Err(e)
        }
    }
}

/// Serves one frontend until it disconnects.
fn serve_one(io: &Arc<PortIo>, shared: &Shared, frontend: UnixStream) {
    run_conn(io, shared, frontend);
    // The connection's daemon is gone, its worker thread joined.
    io.connection_ended();
}

fn run_conn(io: &Arc<PortIo>, shared: &Shared, frontend: UnixStream) {
    if let Err(e) = frontend.set_nonblocking(false) {
        warn!(port = %io.name, error = %e, "cannot use the frontend's connection");
        return;
    }
    let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let conn = match Conn::new(io.clone(), mem.clone()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            error!(port = %io.name, error = %e, "cannot set up a connection");
            return;
        }
    };
    let mut daemon = match VhostUserDaemon::new(
        format!("vhost-user-{}", io.name),
        NetBackend(conn.clone()),
        mem,
    ) {
        Ok(d) => d,
        Err(e) => {
            error!(port = %io.name, error = %e, "cannot create the vhost-user daemon");
            return;
        }
    };
    {
        let handlers = daemon.get_epoll_handlers();
        let Some(worker) = handlers.first() else {
            error!(port = %io.name, "vhost-user daemon has no worker thread");
            return;
        };
        let timer = lock(&io.throttle).as_raw_fd();
        for (fd, event, what) in [
            (
                io.egress.notifier().as_raw_fd(),
                EGRESS_EVENT,
                "the egress queue",
            ),
            (timer, THROTTLE_EVENT, "the shaping timer"),
            (io.tx_more.as_raw_fd(), TX_MORE_EVENT, "the TX re-arm event"),
        ] {
            if let Err(e) = worker.register_listener(fd, EventSet::IN, u64::from(event)) {
                error!(port = %io.name, error = %e, "cannot watch {what}");
                return;
            }
        }
    }
    let (mut listener, backend, dir) = match daemon_channel() {
        Ok(c) => c,
        Err(e) => {
            error!(port = %io.name, error = %e, "cannot connect the shim to the daemon");
            return;
        }
    };
    let started = daemon.start(&mut listener);
    drop(listener);
    let _ = std::fs::remove_dir(&dir);
    if let Err(e) = started {
        error!(port = %io.name, error = %e, "vhost-user daemon did not start");
        return;
    }
    let shims = match start_shims(&io.name, &frontend, &backend, conn.clone()) {
        Ok(s) => s,
        Err(e) => {
            error!(port = %io.name, error = %e, "cannot start the shim");
            daemon.request_shutdown();
            let _ = daemon.wait();
            return;
        }
    };

    let n = shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
    let stale = io.drop_egress();
    *lock(&shared.current) = Some(conn.clone());
    *lock(&shared.shutdown) = daemon.shutdown_handle();
    if shared.stop.load(Ordering::Acquire) {
        daemon.request_shutdown();
    }
    info!(port = %io.name, connection = n, dropped_stale = stale, "vhost-user frontend attached");
    match daemon.wait() {
        Ok(()) => info!(port = %io.name, "vhost-user frontend disconnected"),
        Err(e) => info!(port = %io.name, error = %e, "vhost-user frontend connection ended"),
    }
    lock(&shared.shutdown).take();
    lock(&shared.current).take();
    conn.running.store(false, Ordering::Release);
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
    for s in shims {
        let _ = s.join();
    }
    // Dropping the daemon stops its worker thread and unmaps guest memory.
    drop(daemon);
}
