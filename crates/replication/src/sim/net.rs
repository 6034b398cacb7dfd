//! The simulated network between the primaries and the backup: every
//! connection is a pair of in-memory streams joined by two relay tasks, one
//! per direction, which a schedule can cut (bytes wait, as TCP would keep
//! retransmitting them), slow down, or reset.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backup::Backup;
use crate::link::{BoxFuture, BoxStream, Connect};

/// One direction's state: open or cut.
pub(super) struct Direction {
    up: watch::Sender<bool>,
}

impl Direction {
    fn new() -> Self {
        Direction {
            up: watch::channel(true).0,
        }
    }

    pub(super) fn set(&self, up: bool) {
        self.up.send_replace(up);
    }

    fn is_up(&self) -> bool {
        *self.up.borrow()
    }
}

pub(super) struct Net {
    pub(super) to_backup: Direction,
    pub(super) to_primary: Direction,
    /// One-way delay of every chunk, ms.
    pub(super) latency_ms: Arc<AtomicU64>,
    backup: Arc<Backup>,
    /// Every relay and backup handler, so a reset (or the end of the
    /// scenario) can stop them.
    tasks: Mutex<Vec<Vec<JoinHandle<()>>>>,
}

impl Net {
    pub(super) fn new(backup: Arc<Backup>) -> Arc<Net> {
        Arc::new(Net {
            to_backup: Direction::new(),
            to_primary: Direction::new(),
            latency_ms: Arc::new(AtomicU64::new(0)),
            backup,
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Resets every open connection (both ends see it end).
    pub(super) fn reset(&self) {
        for conn in self.tasks.lock().drain(..) {
            for t in conn {
                t.abort();
            }
        }
    }

    fn open(&self, peer: &str) -> DuplexStream {
        const BUF: usize = 64 * 1024;
        let (primary_end, primary_far) = tokio::io::duplex(BUF);
        let (backup_end, backup_far) = tokio::io::duplex(BUF);
        let (from_primary, to_primary) = tokio::io::split(primary_far);
        let (from_backup, to_backup) = tokio::io::split(backup_far);
        let lat = self.latency_ms.clone();
        let forward = tokio::spawn(relay(
            from_primary,
            to_backup,
            self.to_backup.up.subscribe(),
            lat.clone(),
        ));
        let back = tokio::spawn(relay(
            from_backup,
            to_primary,
            self.to_primary.up.subscribe(),
            lat,
        ));
        let serve = tokio::spawn(
            self.backup
                .clone()
                .serve(Box::pin(backup_end) as BoxStream, peer.to_string()),
        );
        self.tasks.lock().push(vec![forward, back, serve]);
        primary_end
    }
}

/// Moves bytes one way, holding them while the direction is cut.
async fn relay(
    mut from: ReadHalf<DuplexStream>,
    mut to: WriteHalf<DuplexStream>,
    mut up: watch::Receiver<bool>,
    latency_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if up.wait_for(|u| *u).await.is_err() {
            return;
        }
        let ms = latency_ms.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// A primary's way to the backup over the simulated network.
pub(super) struct SimLink {
    pub(super) net: Arc<Net>,
    pub(super) peer: String,
}

impl std::fmt::Display for SimLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sim:{}", self.peer)
    }
}

impl Connect for SimLink {
    fn connect(&self) -> BoxFuture<'_, std::io::Result<BoxStream>> {
        Box::pin(async move {
            if !self.net.to_backup.is_up() || !self.net.to_primary.is_up() {
                // A handshake cannot complete across a cut: the caller
                // sees a connect timeout (shortened; the real one is 5 s).
                tokio::time::sleep(Duration::from_millis(300)).await;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ));
            }
            Ok(Box::pin(self.net.open(&self.peer)) as BoxStream)
        })
    }
}
