//! Device-state checkpoints of a running QEMU, and restoring from them.
//!
//! Guest RAM lives in a shared file, so a checkpoint needs only QEMU's
//! *device* state: a migration with the `x-ignore-shared` capability skips
//! shared RAM blocks and streams just devices and small ROM blocks (~600 KB).
//! With the guest stopped this takes a few milliseconds. A fresh QEMU started
//! with `-incoming defer` on a copy of the RAM file and fed that stream
//! resumes exactly where the checkpoint was taken.
//!
//! The stream goes through a unix socket owned by tandem, never through a
//! file QEMU writes, so tandem sees every byte and knows when it is whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_qmp::{QmpClient, QmpError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Largest device-state stream accepted; real ones are well under 1 MiB.
pub const MAX_DEVICE_STATE: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("migration {0}")]
    Migration(String),
    #[error("device-state stream over {MAX_DEVICE_STATE} bytes")]
    TooLarge,
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let context = context.into();
    move |source| CheckpointError::Io { context, source }
}

const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets the migration capabilities and parameters both directions need.
/// Idempotent; call before the first save or load, and again after a live
/// migration of the same QEMU (QEMU keeps what it set: TLS credentials a
/// local socket's stream cannot use, multifd, postcopy).
pub async fn prepare(qmp: &QmpClient) -> Result<(), CheckpointError> {
    qmp.execute_raw(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": true},
            {"capability": "events", "state": true},
            {"capability": "auto-converge", "state": false},
            {"capability": "postcopy-ram", "state": false},
            {"capability": "multifd", "state": false},
        ]}),
        QMP_TIMEOUT,
    )
    .await?;
    // The default bandwidth cap (128 MiB/s on 10.0, 32 MiB/s on 7.2) would
    // stretch the pause; the stream only goes to a local socket, in the
    // clear (a migrated-in QEMU still has its stream's credentials set).
    qmp.execute_raw(
        "migrate-set-parameters",
        json!({
            "max-bandwidth": 1u64 << 40,
            "tls-creds": "",
            "tls-hostname": "",
            "tls-authz": "",
        }),
        QMP_TIMEOUT,
    )
    .await?;
    Ok(())
}

/// Takes the device state of a *stopped* QEMU. The caller stops the guest
/// before and resumes it after; this only runs the migration. The stream
/// is taken from a process of tandemd's own user; prefer
/// [`save_device_state_from`], which knows QEMU's pid.
pub async fn save_device_state(
    qmp: &QmpClient,
    socket: &Path,
    timeout: Duration,
) -> Result<Vec<u8>, CheckpointError> {
    save_device_state_from(qmp, socket, None, timeout).await
}

/// [`save_device_state`], taking the stream only from the process
/// `qemu_pid` (`SO_PEERCRED`): a connection from anyone else, even one
/// that reached the socket first, is refused (and logged), never read as
/// the guest's device state. With `qemu_pid` unknown, any process of
/// tandemd's own user is taken. The socket is bound 0600.
pub async fn save_device_state_from(
    qmp: &QmpClient,
    socket: &Path,
    qemu_pid: Option<u32>,
    timeout: Duration,
) -> Result<Vec<u8>, CheckpointError> {
    let listener = bind_private(socket)?;
    let _cleanup = RemoveOnDrop(socket.to_path_buf());
    let deadline = Instant::now() + timeout;
    // Whatever happens next, the previous save no longer stands for the
    // guest's state unless QEMU proves it does (below).
    let previous = last_saved().remove(socket);
    if let Err(e) = qmp
        .execute_raw(
            "migrate",
            json!({"uri": format!("unix:{}", socket.display())}),
            QMP_TIMEOUT,
        )
        .await
    {
        // A save of a guest that was already paused leaves QEMU in
        // `postmigrate`, where it refuses another migration. The state
        // is then still the one the last save captured: `postmigrate` is
        // left only by running the guest, and no migration can happen in
        // it. So a paused, protected (or twice checkpointed) guest keeps
        // its checkpoints.
        if let Some(state) = previous {
            if query_status(qmp).await.is_ok_and(|s| s == "postmigrate") {
                last_saved().insert(socket.to_path_buf(), state.clone());
                return Ok(state);
            }
        }
        return Err(e.into());
    }

    let read = async {
        let mut conn = accept_from(&listener, qemu_pid).await?;
        let mut buf = Vec::with_capacity(1 << 20);
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            let n = conn
                .read(&mut chunk)
                .await
                .map_err(io("reading the device-state stream"))?;
            if n == 0 {
                break;
            }
            if buf.len() + n > MAX_DEVICE_STATE {
                return Err(CheckpointError::TooLarge);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(buf)
    };
    let stream = tokio::time::timeout_at(deadline.into(), read)
        .await
        .map_err(|_| CheckpointError::Timeout(timeout, "the device-state stream"))??;
    wait_migration(qmp, deadline, timeout).await?;
    last_saved().insert(socket.to_path_buf(), stream.clone());
    Ok(stream)
}

/// The last device state each QEMU saved, by its checkpoint socket (one
/// per VM): what a guest left in `postmigrate` still holds.
fn last_saved() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Vec<u8>>> {
    static LAST_SAVED: OnceLock<Mutex<HashMap<PathBuf, Vec<u8>>>> = OnceLock::new();
    LAST_SAVED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

async fn query_status(qmp: &QmpClient) -> Result<String, QmpError> {
    let v = qmp
        .execute_raw("query-status", json!({}), QMP_TIMEOUT)
        .await?;
    Ok(v.get("status")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string())
}

/// Feeds a device-state stream to a QEMU started with `-incoming defer`
/// whose RAM file already holds the checkpoint's RAM. Leaves it paused.
pub async fn load_device_state(
    qmp: &QmpClient,
    socket: &Path,
    state: &[u8],
    timeout: Duration,
) -> Result<(), CheckpointError> {
    let deadline = Instant::now() + timeout;
    let _ = std::fs::remove_file(socket);
    let _cleanup = RemoveOnDrop(socket.to_path_buf());
    qmp.execute_raw(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", socket.display())}),
        QMP_TIMEOUT,
    )
    .await?;
    let send = async {
        let mut conn = loop {
            match UnixStream::connect(socket).await {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => return Err(io("connecting to QEMU's incoming socket")(e)),
            }
        };
        conn.write_all(state)
            .await
            .map_err(io("sending the device-state stream"))?;
        conn.shutdown().await.map_err(io("closing the stream"))?;
        Ok(())
    };
    tokio::time::timeout_at(deadline.into(), send)
        .await
        .map_err(|_| CheckpointError::Timeout(timeout, "QEMU to take the device state"))??;
    wait_migration(qmp, deadline, timeout).await
}

/// Polls `query-migrate` until the migration ends. Polling (not events)
/// keeps this correct even when the completion event raced ahead of us.
async fn wait_migration(
    qmp: &QmpClient,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), CheckpointError> {
    loop {
        let info: Value = qmp
            .execute_raw("query-migrate", json!({}), QMP_TIMEOUT)
            .await?;
        match info.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let why = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(CheckpointError::Migration(format!("failed: {why}")));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(CheckpointError::Timeout(
                timeout,
                "the migration to complete",
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A listening socket at `path`, mode 0600, replacing a stale socket
/// there (but nothing else).
fn bind_private(path: &Path) -> Result<UnixListener, CheckpointError> {
    let bind = || -> std::io::Result<UnixListener> {
        let l = crate::sock::bind_unix(path, crate::sock::SocketPerms::PRIVATE)?;
        l.set_nonblocking(true)?;
        UnixListener::from_std(l)
    };
    bind().map_err(io(format!("bind {}", path.display())))
}

/// The first connection from QEMU (see [`save_device_state_from`]);
/// others are closed.
async fn accept_from(
    listener: &UnixListener,
    qemu_pid: Option<u32>,
) -> Result<UnixStream, CheckpointError> {
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let (conn, _) = listener
            .accept()
            .await
            .map_err(io("accepting QEMU's migration stream"))?;
        let verdict = conn
            .peer_cred()
            .map_err(|e| format!("no peer credentials: {e}"))
            .and_then(|c| peer_is_qemu(c.pid(), c.uid(), qemu_pid, me));
        match verdict {
            Ok(()) => return Ok(conn),
            Err(why) => tracing::warn!(
                socket = ?listener.local_addr().ok(),
                "refused a connection to the device-state socket: {why}"
            ),
        }
    }
}

/// Whether a peer (`pid`, `uid` by `SO_PEERCRED`) is the QEMU expected:
/// the process `qemu_pid` when known, else a process of user `me`.
fn peer_is_qemu(pid: Option<i32>, uid: u32, qemu_pid: Option<u32>, me: u32) -> Result<(), String> {
    match qemu_pid {
        Some(want) if pid.and_then(|p| u32::try_from(p).ok()) == Some(want) => Ok(()),
        Some(want) => Err(format!(
            "pid {} (uid {uid}) is not QEMU (pid {want})",
            pid.map_or("unknown".to_string(), |p| p.to_string())
        )),
        None if uid == me => Ok(()),
        None => Err(format!("uid {uid} is not tandemd's ({me})")),
    }
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_qemu_or_our_user_is_a_device_state_peer() {
        assert!(peer_is_qemu(Some(42), 0, Some(42), 0).is_ok());
        let e = peer_is_qemu(Some(43), 0, Some(42), 0).unwrap_err();
        assert!(e.contains("not QEMU (pid 42)"), "{e}");
        assert!(peer_is_qemu(None, 0, Some(42), 0).is_err());
        assert!(peer_is_qemu(Some(7), 0, None, 0).is_ok());
        assert!(peer_is_qemu(Some(7), 1000, None, 0).is_err());
    }

    /// The first connector is not taken for QEMU: a process that is not
    /// QEMU is refused (its connection closed unread), and QEMU's own
    /// connection, after it, is the stream.
    #[tokio::test]
    async fn the_first_connector_is_not_taken_for_qemu() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("checkpoint.sock");
        std::fs::write(&path, "not a socket").unwrap();
        assert!(bind_private(&path).is_err(), "replaced a file");
        std::fs::remove_file(&path).unwrap();
        let listener = bind_private(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // "QEMU" is another process; this one connects first.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let qemu = other.id();
        let mut intruder = UnixStream::connect(&path).await.unwrap();
        let accepted = tokio::time::timeout(
            Duration::from_millis(300),
            accept_from(&listener, Some(qemu)),
        )
        .await;
        assert!(accepted.is_err(), "the intruder was taken for QEMU");
        let mut buf = [0u8; 1];
        assert_eq!(intruder.read(&mut buf).await.unwrap(), 0, "not closed");

        // When this process is the one expected, its connection is taken.
        let _conn = UnixStream::connect(&path).await.unwrap();
        let taken = accept_from(&listener, Some(std::process::id())).await;
        assert!(taken.is_ok());
        let _ = other.kill();
        let _ = other.wait();
    }
}
