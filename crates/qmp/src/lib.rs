//! An async QMP client for QEMU.
//!
//! It owns the QMP transport over a unix socket: the greeting and capability
//! negotiation, typed commands (the `qapi` crate's generated QMP schema),
//! an untyped escape hatch, and an event stream. Every wait on the socket is
//! bounded by a timeout, and a peer that sends garbage or closes mid-reply
//! produces a typed error, never a hang or a panic.
//!
//! One background task owns the read half of the socket. Replies are matched
//! to callers by the QMP `id`, so any number of tasks may issue commands on
//! one [`QmpClient`] at once; events fan out on a broadcast channel.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch, Mutex as AsyncMutex};

pub use qapi::qmp;
pub use qapi::Command;

/// The longest QMP line accepted. Real replies are far smaller; the cap keeps
/// a garbage peer from growing the buffer without bound.
pub const MAX_LINE: usize = 16 * 1024 * 1024;
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
const EVENT_BUFFER: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP timed out waiting for {what} after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("QMP connection closed")]
    Closed,
    #[error("QEMU refused: {class}: {desc}")]
    Qemu { class: String, desc: String },
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// QEMU's timestamp: seconds and microseconds since the epoch.
    pub timestamp: Option<(u64, u64)>,
}

impl QmpEvent {
    /// The event as the `qapi` schema's typed enum, when it is one QEMU's
    /// schema (as known to `qapi`) describes.
    pub fn typed(&self) -> Option<qmp::Event> {
        let mut v = serde_json::json!({ "event": self.name, "data": self.data });
        if let Some((s, us)) = self.timestamp {
            v["timestamp"] = serde_json::json!({ "seconds": s, "microseconds": us });
        } else {
            v["timestamp"] = serde_json::json!({ "seconds": 0, "microseconds": 0 });
        }
        serde_json::from_value(v).ok()
    }
}

type Pending = HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>;

struct Shared {
    writer: AsyncMutex<OwnedWriteHalf>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: AtomicBool,
    closed_tx: watch::Sender<bool>,
    call_timeout: Duration,
}

impl Shared {
    fn pending(&self) -> parking_lot::MutexGuard<'_, Pending> {
        self.pending.lock()
    }

    /// Marks the connection dead and fails every caller still waiting.
    fn close(&self, why: impl Fn() -> QmpError) {
        self.closed.store(true, Ordering::SeqCst);
        let waiters: Vec<_> = self.pending().drain().collect();
        for (_, tx) in waiters {
            let _ = tx.send(Err(why()));
        }
        let _ = self.closed_tx.send(true);
    }
}

/// A connected, negotiated QMP session. Cheap to clone; clones share it.
#[derive(Clone)]
pub struct QmpClient {
    shared: Arc<Shared>,
    closed_rx: watch::Receiver<bool>,
    /// QEMU's version from the greeting.
    version: Arc<Value>,
}

impl QmpClient {
    /// Connects to a QMP socket, reads the greeting and negotiates
    /// capabilities, all within `timeout`.
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, QmpError> {
        Self::connect_with(path.as_ref(), timeout, DEFAULT_CALL_TIMEOUT).await
    }

    /// Like [`connect`](Self::connect), with `call_timeout` as the default
    /// bound of each later command.
    pub async fn connect_with(
        path: &Path,
        timeout: Duration,
        call_timeout: Duration,
    ) -> Result<Self, QmpError> {
        let fut = async {
            let stream = UnixStream::connect(path).await?;
            Self::handshake(stream, call_timeout).await
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(QmpError::Timeout {
                    what: format!("QMP greeting on {}", path.display()),
                    after: timeout,
                })
            })
    }

    /// Retries [`connect`](Self::connect) until the socket accepts (QEMU
    /// creates it shortly after it starts), for at most `timeout` in all.
    pub async fn connect_retry(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<Self, QmpError> {
        let path = path.as_ref();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match Self::connect(path, left).await {
                Ok(c) => return Ok(c),
                // Only a socket that is not there yet is worth retrying; a
                // peer that answered with garbage will not get better.
                Err(QmpError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && !left.is_zero() =>
                {
                    tokio::time::sleep(Duration::from_millis(20).min(left)).await;
                }
                Err(QmpError::Io(_)) if left.is_zero() => {
                    return Err(QmpError::Timeout {
                        what: format!("QMP socket {}", path.display()),
                        after: timeout,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn handshake(stream: UnixStream, call_timeout: Duration) -> Result<Self, QmpError> {
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = read_message(&mut reader).await?.ok_or(QmpError::Closed)?;
        let version = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .cloned()
            .ok_or_else(|| {
                QmpError::Protocol(format!(
                    "expected a QMP greeting, got {}",
                    truncate(&greeting)
                ))
            })?;

        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (closed_tx, closed_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            writer: AsyncMutex::new(write),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            events,
            closed: AtomicBool::new(false),
            closed_tx,
            call_timeout,
        });
        tokio::spawn(read_loop(reader, shared.clone()));
        let client = QmpClient {
            shared,
            closed_rx,
            version: Arc::new(version),
        };
        client
            .execute_raw("qmp_capabilities", serde_json::json!({}), call_timeout)
            .await?;
        Ok(client)
    }

    /// QEMU's version object from the greeting.
    pub fn version(&self) -> &Value {
        &self.version
    }

    /// Executes a typed command with the default per-call timeout.
    pub async fn execute<C: Command>(&self, cmd: C) -> Result<C::Ok, QmpError> {
        self.execute_timeout(cmd, self.shared.call_timeout).await
    }

    /// Executes a typed command, waiting at most `timeout` for the reply.
    pub async fn execute_timeout<C: Command>(
        &self,
        cmd: C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(&cmd)
            .map_err(|e| QmpError::Protocol(format!("encoding {}: {e}", C::NAME)))?;
        let reply = self.execute_raw(C::NAME, args, timeout).await?;
        serde_json::from_value(reply.clone()).map_err(|e| {
            QmpError::Protocol(format!(
                "unexpected reply to {}: {e}: {}",
                C::NAME,
                truncate(&reply)
            ))
        })
    }

    /// Executes any command by name; `args` must be a JSON object (or null).
    pub async fn execute_raw(
        &self,
        name: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Closed);
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = serde_json::json!({ "execute": name, "id": id });
        if !(args.is_null() || args.as_object().is_some_and(|o| o.is_empty())) {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        self.shared.pending().insert(id, tx);
        // Checked again now that we are registered: close() may have drained
        // the table between the first check and the insert.
        if self.is_closed() {
            self.shared.pending().remove(&id);
            return Err(QmpError::Closed);
        }
        let what = format!("reply to {name}");
        let result = tokio::time::timeout(timeout, async {
            {
                let mut w = self.shared.writer.lock().await;
                w.write_all(&line).await?;
                w.flush().await?;
            }
            rx.await.unwrap_or(Err(QmpError::Closed))
        })
        .await;
        match result {
            Ok(r) => r,
            Err(_) => {
                self.shared.pending().remove(&id);
                Err(QmpError::Timeout {
                    what,
                    after: timeout,
                })
            }
        }
        .inspect_err(|_| {
            self.shared.pending().remove(&id);
        })
    }

    /// Subscribes to events that arrive after this call.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.shared.events.subscribe()
    }

    /// Resolves once the connection is closed (EOF, error or QEMU exit).
    pub async fn closed(&self) {
        let mut rx = self.closed_rx.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }
}

fn truncate(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(0);
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

/// Reads one JSON message (one line). `Ok(None)` is a clean EOF.
async fn read_message(reader: &mut BufReader<OwnedReadHalf>) -> Result<Option<Value>, QmpError> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut *reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        if buf.last() != Some(&b'\n') {
            if buf.len() > MAX_LINE {
                return Err(QmpError::Protocol(format!(
                    "line longer than {MAX_LINE} bytes"
                )));
            }
            // EOF in the middle of a line: the peer closed mid-message.
            return Err(QmpError::Closed);
        }
        if buf.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let v: Value = serde_json::from_slice(&buf).map_err(|e| {
            QmpError::Protocol(format!(
                "not JSON ({e}): {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(120)])
            ))
        })?;
        if !v.is_object() {
            return Err(QmpError::Protocol(format!(
                "not a JSON object: {}",
                truncate(&v)
            )));
        }
        return Ok(Some(v));
    }
}

async fn read_loop(mut reader: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    loop {
        let msg = match read_message(&mut reader).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::debug!("QMP peer closed the connection");
                shared.close(|| QmpError::Closed);
                return;
            }
            Err(e) => {
                tracing::debug!("QMP connection failed: {e}");
                let text = e.to_string();
                let closed = matches!(e, QmpError::Closed | QmpError::Io(_));
                shared.close(|| {
                    if closed {
                        QmpError::Closed
                    } else {
                        QmpError::Protocol(text.clone())
                    }
                });
                return;
            }
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let timestamp = msg.get("timestamp").and_then(|t| {
                Some((
                    t.get("seconds")?.as_u64()?,
                    t.get("microseconds")?.as_u64()?,
                ))
            });
            let ev = QmpEvent {
                name: name.to_string(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
                timestamp,
            };
            tracing::trace!(event = %ev.name, "QMP event");
            // No subscribers is fine: events are advisory.
            let _ = shared.events.send(ev);
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::debug!("QMP message without id ignored: {}", truncate(&msg));
            continue;
        };
        let Some(tx) = shared.pending().remove(&id) else {
            // The caller timed out and went away.
            continue;
        };
        let result = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else if let Some(err) = msg.get("error") {
            Err(QmpError::Qemu {
                class: err
                    .get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_string(),
                desc: err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            })
        } else {
            Err(QmpError::Protocol(format!(
                "reply with neither return nor error: {}",
                truncate(&msg)
            )))
        };
        let _ = tx.send(result);
    }
}
