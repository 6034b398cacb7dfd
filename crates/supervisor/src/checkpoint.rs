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

use std::path::{Path, PathBuf};
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
/// Idempotent; call once per QEMU before the first save or load.
pub async fn prepare(qmp: &QmpClient) -> Result<(), CheckpointError> {
    qmp.execute_raw(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": true},
            {"capability": "events", "state": true},
        ]}),
        QMP_TIMEOUT,
    )
    .await?;
    // The default bandwidth cap (128 MiB/s on 10.0, 32 MiB/s on 7.2) would
    // stretch the pause; the stream only goes to a local socket.
    qmp.execute_raw(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 40}),
        QMP_TIMEOUT,
    )
    .await?;
    Ok(())
}

/// Takes the device state of a *stopped* QEMU. The caller stops the guest
/// before and resumes it after; this only runs the migration.
pub async fn save_device_state(
    qmp: &QmpClient,
    socket: &Path,
    timeout: Duration,
) -> Result<Vec<u8>, CheckpointError> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(io(format!("bind {}", socket.display())))?;
    let _cleanup = RemoveOnDrop(socket.to_path_buf());
    let deadline = Instant::now() + timeout;
    qmp.execute_raw(
        "migrate",
        json!({"uri": format!("unix:{}", socket.display())}),
        QMP_TIMEOUT,
    )
    .await?;

    let read = async {
        let (mut conn, _) = listener
            .accept()
            .await
            .map_err(io("accepting QEMU's migration stream"))?;
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
    Ok(stream)
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

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
