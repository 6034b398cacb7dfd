//! Disk replication on the primary: each protected disk is mirrored by
//! QEMU (`blockdev-mirror`, `sync=full`, `copy-mode=write-blocking`) to an
//! NBD export served here, so every guest write is seen — and logged for
//! its epoch — before the guest is told it completed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

/// The mirror job's chunk size: the smallest QEMU allows, so that every
/// guest write is mirrored before it completes. Costs one bit per 512
/// bytes of disk (2 MiB of bitmap per 8 GiB).
const MIRROR_GRANULARITY: u64 = 512;
use tandem_nbd::{DiskWrite, Export, ServerHandle};
use tandem_replication::{disklog, DiskSource};
use tandem_supervisor::{GuestPort, SupervisorError};
use tracing::{info, warn};

pub struct MirroredDisk {
    name: String,
    export: Arc<Export>,
    server: parking_lot::Mutex<Option<ServerHandle>>,
    synced: AtomicBool,
    resync: AtomicBool,
}

impl MirroredDisk {
    fn job_id(&self) -> String {
        format!("ft-{}", self.name)
    }
    fn target_node(&self) -> String {
        format!("ftm-{}", self.name)
    }
}

impl DiskSource for MirroredDisk {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.export.size()
    }
    fn take_writes(&self) -> Vec<u8> {
        let taken = self.export.take_writes();
        let mut out = Vec::new();
        // A log that passed its cap was dropped: the whole disk instead.
        if self.resync.swap(false, Ordering::SeqCst) || taken.is_err() {
            if let Err(o) = &taken {
                info!(disk = %self.name, "{o}");
            }
            // The whole disk as the target holds it now; writes racing
            // with this read are also in the next log, and replaying them
            // is harmless.
            if let Err(e) = full_copy(self.export.path(), self.export.size(), &mut out) {
                warn!(disk = %self.name, "full disk copy failed: {e}; will retry");
                self.resync.store(true, Ordering::SeqCst);
                out.clear();
            }
            return out;
        }
        for w in taken.map(|l| l.into_writes()).unwrap_or_default() {
            match w {
                DiskWrite::Data { offset, data } => disklog::push(&mut out, offset, &data),
                DiskWrite::Zero { offset, len } => disklog::push_zero(&mut out, offset, len),
            }
        }
        out
    }
    fn resync_all(&self) {
        let _ = self.export.take_writes();
        self.resync.store(true, Ordering::SeqCst);
    }
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }
}

/// Encodes the whole backing file: data for non-zero chunks, zero records
/// for the rest (the replica may hold stale data there).
fn full_copy(path: &Path, size: u64, out: &mut Vec<u8>) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off)?;
        if buf[..n].iter().all(|&b| b == 0) {
            disklog::push_zero(out, off, n as u64);
        } else {
            disklog::push(out, off, &buf[..n]);
        }
        off += n as u64;
    }
    Ok(())
}

/// Why mirroring a VM's disks could not start.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("creating {}: {source}", path.display())]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] SupervisorError),
    #[error("QEMU does not report block node {0}")]
    NoBlockNode(String),
    #[error(transparent)]
    Nbd(#[from] tandem_nbd::NbdError),
    #[error("mirroring disk {disk}: {source}")]
    Mirror {
        disk: String,
        source: SupervisorError,
    },
}

/// Starts mirroring every writable disk of the VM. On error, whatever was
/// set up is torn down again.
pub async fn start(port: &GuestPort, work: &Path) -> Result<Vec<Arc<MirroredDisk>>, MirrorError> {
    std::fs::create_dir_all(work).map_err(|source| MirrorError::WorkDir {
        path: work.to_path_buf(),
        source,
    })?;
    let nodes = port
        .qmp("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let mut disks: Vec<Arc<MirroredDisk>> = Vec::new();
    for d in port.spec().disks.iter().filter(|d| !d.readonly) {
        let node = tandem_vmspec::disk_node_name(&d.name);
        let size = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == node.as_str()))
            .and_then(|n| n["image"]["virtual-size"].as_u64())
            .ok_or_else(|| MirrorError::NoBlockNode(node.clone()))?;
        let export = Export::with_name(
            d.name.clone(),
            work.join(format!("mirror-{}.raw", d.name)),
            size,
        )?;
        let sock = work.join(format!("nbd-{}.sock", d.name));
        let server = tandem_nbd::serve_unix(export.clone(), &sock)?;
        let disk = Arc::new(MirroredDisk {
            name: d.name.clone(),
            export,
            server: parking_lot::Mutex::new(Some(server)),
            synced: AtomicBool::new(false),
            resync: AtomicBool::new(false),
        });
        let setup = async {
            port.qmp(
                "blockdev-add",
                json!({
                    "driver": "nbd",
                    "node-name": disk.target_node(),
                    "server": {"type": "unix", "path": sock},
                    "export": d.name,
                }),
            )
            .await?;
            port.qmp(
                "blockdev-mirror",
                json!({
                    "job-id": disk.job_id(),
                    "device": node,
                    "target": disk.target_node(),
                    "sync": "full",
                    "copy-mode": "write-blocking",
                    // Write-blocking mode copies a guest write to the target
                    // before completing it, but QEMU tracks the job in
                    // granularity chunks (default: the target's cluster
                    // size, 64 KiB for NBD), and parts of a write that do
                    // not cover whole chunks may be left to the background
                    // copy. Every virtio-blk write is 512-aligned, so with
                    // 512-byte chunks nothing is.
                    "granularity": MIRROR_GRANULARITY,
                }),
            )
            .await
        };
        if let Err(source) = setup.await {
            disks.push(disk);
            stop(port, &disks).await;
            return Err(MirrorError::Mirror {
                disk: d.name.clone(),
                source,
            });
        }
        info!(vm = %port.name(), disk = %d.name, size, "mirroring disk to the replication export");
        disks.push(disk);
    }
    // Watch the jobs until each has finished its initial copy.
    let watch_port = port.clone();
    let watch_disks = disks.clone();
    tokio::spawn(async move {
        for _ in 0..36_000 {
            let Ok(jobs) = watch_port.qmp("query-block-jobs", json!({})).await else {
                return;
            };
            let mut pending = 0;
            for d in &watch_disks {
                let job = jobs
                    .as_array()
                    .and_then(|a| a.iter().find(|j| j["device"] == d.job_id().as_str()));
                match job {
                    Some(j) if j["ready"] == Value::Bool(true) => {
                        if !d.synced.swap(true, Ordering::SeqCst) {
                            info!(disk = %d.name, "initial disk copy complete");
                        }
                    }
                    Some(_) => pending += 1,
                    None => return, // cancelled or failed: protection is ending
                }
            }
            if pending == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Ok(disks)
}

/// Ends mirroring: cancels the jobs, removes the NBD nodes, stops serving.
pub async fn stop(port: &GuestPort, disks: &[Arc<MirroredDisk>]) {
    for d in disks {
        let _ = port
            .qmp(
                "block-job-cancel",
                json!({"device": d.job_id(), "force": true}),
            )
            .await;
    }
    // Cancellation is asynchronous; the target node is busy until it ends.
    for _ in 0..100 {
        let jobs = port
            .qmp("query-block-jobs", json!({}))
            .await
            .unwrap_or(Value::Null);
        let busy = disks.iter().any(|d| {
            jobs.as_array()
                .is_some_and(|a| a.iter().any(|j| j["device"] == d.job_id().as_str()))
        });
        if !busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for d in disks {
        let _ = port
            .qmp("blockdev-del", json!({"node-name": d.target_node()}))
            .await;
        if let Some(s) = d.server.lock().take() {
            s.shutdown();
        }
    }
}
