//! The link's two directions as the primary drives them: bounded writes of
//! frames, and a reader that handles acks and heartbeats itself (so
//! liveness is seen even while the loop is busy sending) and passes the
//! rest on.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use super::fence::Contact;
use crate::clock::Instant;
use crate::tracker::RamView;
use crate::wire::{self, Frame, FrameKind};
use crate::EpochObserver;

/// A frame from the backup for the epoch loop, or why the link ended.
pub(super) type FromBackup = Result<Frame, String>;

pub(super) async fn send<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    f: &Frame,
    bound: Duration,
) -> std::io::Result<()> {
    write_frames(w, std::slice::from_ref(f), bound)
        .await
        .map(|_| ())
}

/// Writes frames, giving up after `bound`: a backup that stopped reading
/// must not hold the epoch loop forever.
pub(super) async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Frame],
    bound: Duration,
) -> std::io::Result<u64> {
    let io = async {
        let mut bytes = 0u64;
        for f in frames {
            let enc = f.encode();
            bytes += enc.len() as u64;
            w.write_all(&enc).await?;
        }
        w.flush().await?;
        Ok(bytes)
    };
    tokio::time::timeout(bound, io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "send timed out"))?
}

/// Reads the backup's frames: acks and heartbeats are handled here (so
/// liveness is seen even while the loop is busy sending); the hello answer,
/// resync requests and errors go to the loop.
pub(super) async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    mut rd: R,
    tx: mpsc::UnboundedSender<FromBackup>,
    contact: Arc<Contact>,
    committed: watch::Sender<u64>,
    observer: Option<Arc<dyn EpochObserver>>,
) {
    let mut first = true;
    loop {
        let msg = match wire::read_frame(&mut rd).await {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err("backup closed the connection".to_string()),
            Err(e) => Err(format!("reading from backup: {e}")),
        };
        if let Ok(f) = &msg {
            match f.kind {
                FrameKind::Heartbeat => {
                    contact.touch();
                    continue;
                }
                FrameKind::Committed if !first => {
                    contact.touch();
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
                    contact.touch();
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
