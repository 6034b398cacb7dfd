//! The link's two directions as the primary drives them: bounded writes of
//! frames, and a reader that handles acks and heartbeats itself (so
//! liveness is seen even while the loop is busy sending) and passes the
//! rest on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::fence::Contact;
use crate::clock::Instant;
use crate::tracker::RamView;
use crate::wire::{self, Frame, FrameKind};
use crate::EpochObserver;

/// A frame from the backup for the epoch loop, or why the link ended.
pub(super) type FromBackup = Result<Frame, String>;

/// The link's sending half, driven by its own task. Frames the epoch loop
/// queues go out in order, and a heartbeat goes out every heartbeat
/// interval whatever else is sent — between the frames of a long batch,
/// and while the loop is busy without sending (copying or scanning RAM for
/// a running copy, waiting for the backup's digest) — so the backup never
/// takes a busy primary for a dead one.
///
/// Each heartbeat carries its stamp: milliseconds since the session's
/// origin on the monotonic clock. The backup echoes the newest stamp it
/// has read, and that echo is the only thing that keeps this side from
/// fencing (see [`super::fence`]).
pub(super) struct LinkWriter {
    queue: mpsc::UnboundedSender<Batch>,
    /// Set by the loop while it idles (the test hook that restores
    /// heartbeats-only-when-idle reads it).
    idle: Arc<AtomicBool>,
    _task: AbortOnDrop,
}

struct Batch {
    frames: Vec<Frame>,
    done: oneshot::Sender<std::io::Result<u64>>,
}

impl LinkWriter {
    pub(super) fn spawn<W>(
        wr: W,
        heartbeat: Duration,
        origin: Instant,
        only_when_idle: bool,
    ) -> LinkWriter
    where
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (queue, rx) = mpsc::unbounded_channel();
        let idle = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(write_loop(
            wr,
            rx,
            Heartbeats {
                every: heartbeat,
                origin,
                only_when_idle: only_when_idle.then(|| idle.clone()),
            },
        ));
        LinkWriter {
            queue,
            idle,
            _task: AbortOnDrop(task),
        }
    }

    /// Sends `frames`, giving up after `bound`: a backup that stopped
    /// reading must not hold the epoch loop forever. Returns the bytes sent.
    pub(super) async fn send(&self, frames: Vec<Frame>, bound: Duration) -> std::io::Result<u64> {
        let (done, result) = oneshot::channel();
        self.queue
            .send(Batch { frames, done })
            .map_err(|_| std::io::Error::other("the link is closed"))?;
        match tokio::time::timeout(bound, result).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(std::io::Error::other("the link is closed")),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "send timed out",
            )),
        }
    }

    /// Sends one frame.
    pub(super) async fn send_one(&self, frame: Frame, bound: Duration) -> std::io::Result<()> {
        self.send(vec![frame], bound).await.map(|_| ())
    }

    pub(super) fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Relaxed);
    }
}

struct Heartbeats {
    every: Duration,
    origin: Instant,
    /// The fault hook: beat only while the loop idles.
    only_when_idle: Option<Arc<AtomicBool>>,
}

impl Heartbeats {
    /// The next heartbeat, or `None` where the fault hook suppresses it.
    fn frame(&self) -> Option<Vec<u8>> {
        if self
            .only_when_idle
            .as_ref()
            .is_some_and(|idle| !idle.load(Ordering::Relaxed))
        {
            return None;
        }
        Some(
            Frame::new(
                FrameKind::Heartbeat,
                stamp_of(self.origin, Instant::now()),
                0,
                vec![],
            )
            .encode(),
        )
    }
}

/// A heartbeat's stamp: whole milliseconds from `origin` to `at`, rounded
/// down, so the time it stands for is never later than the real send.
pub(super) fn stamp_of(origin: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(origin)
        .as_millis()
        .min(u64::MAX as u128) as u64
}

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    wr: W,
    mut batches: mpsc::UnboundedReceiver<Batch>,
    beats: Heartbeats,
) {
    let mut wr = tokio::io::BufWriter::with_capacity(4 << 20, wr);
    // The hello goes first.
    let mut next_beat = Instant::now() + beats.every;
    loop {
        let batch = tokio::select! {
            b = batches.recv() => match b {
                Some(b) => b,
                None => return,
            },
            _ = tokio::time::sleep_until(next_beat) => {
                next_beat = Instant::now() + beats.every;
                if let Some(hb) = beats.frame() {
                    if wr.write_all(&hb).await.is_err() || wr.flush().await.is_err() {
                        return;
                    }
                }
                continue;
            }
        };
        let mut sent = 0u64;
        let mut result = Ok(());
        for f in &batch.frames {
            if Instant::now() >= next_beat {
                // A long batch must not silence the heartbeat.
                next_beat = Instant::now() + beats.every;
                if let Some(hb) = beats.frame() {
                    if let Err(e) = wr.write_all(&hb).await {
                        result = Err(e);
                        break;
                    }
                    // Pushed out now, not behind the rest of the batch in
                    // the buffer.
                    if let Err(e) = wr.flush().await {
                        result = Err(e);
                        break;
                    }
                }
            }
            let enc = f.encode();
            if let Err(e) = wr.write_all(&enc).await {
                result = Err(e);
                break;
            }
            sent += enc.len() as u64;
        }
        if result.is_ok() {
            result = wr.flush().await;
        }
        let failed = result.is_err();
        let _ = batch.done.send(result.map(|()| sent));
        if failed {
            return;
        }
    }
}

/// Reads the backup's frames: acks and heartbeats are handled here (so
/// liveness is seen even while the loop is busy sending); the hello answer,
/// resync requests and errors go to the loop.
///
/// `sent` is the last epoch handed to the link: an acknowledgement beyond
/// it is a broken or lying backup (it would release output that no replica
/// holds), and ends the session.
///
/// Liveness is two-way: what keeps the fence away is not hearing the
/// backup but the backup having heard *us*. A backup heartbeat echoes the
/// newest of our stamps it has read, and contact moves to the moment that
/// stamp was sent; the answer to hello proves the backup heard the hello,
/// sent at `origin`. Acks and heartbeats that echo nothing new prove only
/// that the backup→primary direction works, which is the direction an
/// asymmetric partition leaves open.
pub(super) struct ReadLoop {
    pub(super) contact: Arc<Contact>,
    pub(super) committed: watch::Sender<u64>,
    pub(super) observer: Option<Arc<dyn EpochObserver>>,
    pub(super) sent: Arc<AtomicU64>,
    /// When this session's hello went out: stamps count from here.
    pub(super) origin: Instant,
    /// The fault hook: any frame from the backup counts as contact (the
    /// version-2 behaviour).
    pub(super) one_way: bool,
}

impl ReadLoop {
    /// Contact as of the moment the stamp `stamp` was sent (never later
    /// than now, whatever a broken backup echoes).
    fn heard_echo(&self, stamp: u64) {
        let at = self.origin + Duration::from_millis(stamp);
        self.contact.heard_as_of(at.min(Instant::now()));
    }
}

pub(super) async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    mut rd: R,
    tx: mpsc::UnboundedSender<FromBackup>,
    ctx: ReadLoop,
) {
    let ReadLoop {
        ref contact,
        ref committed,
        ref observer,
        ref sent,
        origin,
        one_way,
    } = ctx;
    let mut first = true;
    loop {
        let msg = match wire::read_frame(&mut rd).await {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err("backup closed the connection".to_string()),
            Err(e) => Err(format!("reading from backup: {e}")),
        };
        let msg = match msg {
            Ok(f) if f.kind == FrameKind::Committed && !first => {
                let last = sent.load(Ordering::SeqCst);
                if f.epoch > last {
                    Err(format!(
                        "the backup acknowledged epoch {} but only {last} was sent: not trusted",
                        f.epoch
                    ))
                } else {
                    Ok(f)
                }
            }
            other => other,
        };
        if let Ok(f) = &msg {
            match f.kind {
                FrameKind::Heartbeat => {
                    if one_way {
                        contact.touch();
                    } else {
                        ctx.heard_echo(f.epoch);
                    }
                    continue;
                }
                FrameKind::Committed if !first => {
                    if one_way {
                        contact.touch();
                    }
                    let newer = committed.send_if_modified(|c| {
                        let newer = f.epoch > *c;
                        if newer {
                            *c = f.epoch;
                        }
                        newer
                    });
                    if newer {
                        if let Some(o) = &observer {
                            o.committed(f.epoch);
                        }
                    }
                    continue;
                }
                FrameKind::Committed => {
                    first = false;
                    if one_way {
                        contact.touch();
                    } else {
                        contact.heard_as_of(origin);
                    }
                    committed.send_replace(f.epoch);
                }
                _ => {}
            }
        }
        let end = msg.is_err();
        if tx.send(msg).is_err() || end {
            return;
        }
    }
}

/// Of the pages a running copy would send, those whose content differs
/// from the replica's (by the backup's per-page hashes): the rest are
/// already there.
pub(super) fn differing_pages(ram: RamView<'_>, dirty: Vec<u64>, replica: &[u64]) -> Vec<u64> {
    dirty
        .into_iter()
        .filter(|&p| replica.get(p as usize) != Some(&ram.page_hash(p as usize)))
        .collect()
}

/// The backup's digest of its replica RAM, which follows its answer to
/// hello: `None` when it offers none (send everything). Bounded in time;
/// a digest for another RAM size ends the session.
pub(super) async fn receive_digest(
    rx: &mut mpsc::UnboundedReceiver<FromBackup>,
    pages: usize,
) -> Result<Option<Vec<u64>>, String> {
    // Hashing a large replica takes the backup a while (~0.3 s per GiB).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut collector = wire::DigestCollector::default();
    loop {
        let f = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err("backup closed the connection before its digest".into()),
            Err(_) => return Err("backup sent no replica digest within 120 s".into()),
        };
        if f.kind != FrameKind::ReplicaDigest {
            return Err(format!("expected the replica digest, got {f:?}"));
        }
        let d = wire::ReplicaDigest::decode(&f.payload).map_err(|e| e.to_string())?;
        if d.total != 0 && d.total != pages as u64 {
            return Err(format!(
                "the backup's replica has {} pages, this VM {pages}",
                d.total
            ));
        }
        if collector.push(d).map_err(|e| e.to_string())? {
            let hashes = collector.into_hashes();
            return Ok((!hashes.is_empty()).then_some(hashes));
        }
    }
}

/// A `RESYNC` the backup sent before closing, if one arrives shortly.
pub(super) async fn backup_reason(rx: &mut mpsc::UnboundedReceiver<FromBackup>) -> Option<String> {
    let deadline = Instant::now() + Duration::from_millis(300);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(f))) if f.kind == FrameKind::Resync => {
                return Some(format!(
                    "backup resyncs from epoch {}: {}",
                    f.epoch,
                    f.reason()
                ));
            }
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
