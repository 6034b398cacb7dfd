//! Non-shared storage for live migration, the way libvirt does it: the
//! destination's QEMU serves its own empty copy of each disk over NBD (TLS,
//! and only the source's certificate admitted); the source's QEMU mirrors
//! into it (`blockdev-mirror`, `sync=full`, `copy-mode=write-blocking`, so
//! that once a copy has caught up every guest write reaches both disks
//! before the guest sees it complete); the memory stream starts only when
//! every copy has caught up; when the stream completes, the guest is
//! stopped and the copies are complete, the source ends the mirrors and
//! the destination stops its NBD server before it runs the guest.
//!
//! Which disks need a copy is not guessed from paths: the source leaves a
//! probe file with a random nonce beside each disk, and the destination
//! uses a disk in place only where it reads that nonce at the same path.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_api::{MigrationDisk, MigrationSource, StorageCopyTarget, StorageProbe};
use tandem_qmp::QmpClient;
use tracing::{info, warn};

use super::{Supervisor, SupervisorError, Vm};

const QMP_CALL: Duration = Duration::from_secs(10);
/// The prefix of a probe file's name; the VM's name and the nonce follow.
const PROBE_PREFIX: &str = ".tandem-migration-probe-";
/// The destination's own copies live here, inside its directory for the VM.
const COPIES_DIR: &str = "disks";
/// Room the destination keeps free beyond the copies' allocated bytes
/// (qcow2 metadata grows while the copy is written).
const SPARE_BYTES: u64 = 64 << 20;
/// The id of the destination's `authz-list` object admitting the source.
pub(super) const AUTHZ_OBJECT: &str = "tandem-migration-authz";
/// How long a probe file lives if no destination reads it.
const PROBE_LIFETIME: Duration = Duration::from_secs(120);
/// How long the source waits for its mirrors to end once asked.
const MIRROR_END: Duration = Duration::from_secs(30);

/// The node and job id of the source's NBD client for `disk`.
fn mirror_node(disk: &str) -> String {
    format!("migrate-{disk}")
}

/// Where the destination keeps its copies, decided before anything is made.
pub(super) struct IncomingStorage {
    /// The spec with the copied disks' paths pointing at the copies.
    pub spec_toml: String,
    /// The disks to export, in the spec's order.
    pub copied: Vec<String>,
    /// What to make: (path, format, virtual size).
    make: Vec<(PathBuf, String, u64)>,
}

impl Supervisor {
    /// The source's side, before the destination prepares: each disk's
    /// format and sizes, and a probe file beside every disk the destination
    /// might share (none with `copy_all`).
    pub async fn migration_source(
        &self,
        name: &str,
        copy_all: bool,
    ) -> Result<MigrationSource, SupervisorError> {
        let vm = self.get(name).await?;
        let live = vm.live().ok_or_else(|| vm.bad_state("migrate"))?;
        let nodes = live
            .qmp
            .execute_raw("query-named-block-nodes", json!({ "flat": true }), QMP_CALL)
            .await
            .map_err(vm.qmp_err())?;
        let rec = vm.record();
        remove_probes(&vm);
        let mut disks = Vec::new();
        for d in &rec.spec.disks {
            let node = tandem_vmspec::disk_node_name(&d.name);
            let image = nodes
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|n| n.get("node-name").and_then(Value::as_str) == Some(&node))
                })
                .and_then(|n| n.get("image"))
                .ok_or_else(|| {
                    SupervisorError::Refused(format!(
                        "QEMU does not show disk `{}` (node {node})",
                        d.name
                    ))
                })?;
            let size = |k: &str| image.get(k).and_then(Value::as_u64).unwrap_or(0);
            let ours = rec.base.is_some() || d.path.starts_with(&vm.dir);
            let probe = if copy_all || ours {
                None
            } else {
                write_probe(&vm.name, &d.path)
            };
            disks.push(MigrationDisk {
                name: d.name.clone(),
                format: match d.format {
                    tandem_vmspec::DiskFormat::Qcow2 => "qcow2".into(),
                    tandem_vmspec::DiskFormat::Raw => "raw".into(),
                },
                virtual_size: size("virtual-size"),
                allocated: size("actual-size").max(size("virtual-size").min(1 << 20)),
                probe,
            });
        }
        let tls_name = self.identity_name();
        Ok(MigrationSource { tls_name, disks })
    }

    /// The destination's side: which of `disks` it shares (their probes
    /// read and removed) and which it copies, with room for the copies
    /// checked. Nothing is made yet.
    pub(super) async fn plan_incoming_storage(
        &self,
        spec_toml: &str,
        disks: &[MigrationDisk],
    ) -> Result<IncomingStorage, SupervisorError> {
        let spec = tandem_vmspec::parse_and_validate(spec_toml, |_| true)
            .map_err(|e| SupervisorError::Refused(format!("the source's spec: {e}")))?;
        if disks.is_empty() {
            return Ok(IncomingStorage {
                spec_toml: spec_toml.to_string(),
                copied: Vec::new(),
                make: Vec::new(),
            });
        }
        if self.vms.read().await.contains_key(&spec.name) {
            return Err(SupervisorError::Exists(spec.name));
        }
        if disks.len() != spec.disks.len()
            || spec
                .disks
                .iter()
                .any(|d| !disks.iter().any(|m| m.name == d.name))
        {
            return Err(SupervisorError::Refused(
                "the source's disk list does not match the VM's spec".into(),
            ));
        }
        let dir = self.cfg.state_dir.join("vms").join(&spec.name);
        let mut doc: toml::Table = toml::from_str(spec_toml)
            .map_err(|e| SupervisorError::Refused(format!("the source's spec: {e}")))?;
        let mut copied = Vec::new();
        let mut make = Vec::new();
        let mut needed: u64 = 0;
        for d in &spec.disks {
            let m = disks.iter().find(|m| m.name == d.name).expect("checked");
            if m.probe.as_ref().is_some_and(|p| read_probe(p, &d.path)) {
                info!(vm = %spec.name, disk = %d.name, path = %d.path.display(), "shared with the source: used in place");
                continue;
            }
            let ext = match m.format.as_str() {
                "qcow2" => "qcow2",
                "raw" => "raw",
                other => {
                    return Err(SupervisorError::Refused(format!(
                        "disk `{}`: unknown format `{other}`",
                        d.name
                    )))
                }
            };
            if m.virtual_size == 0 {
                return Err(SupervisorError::Refused(format!(
                    "disk `{}`: the source gave no size",
                    d.name
                )));
            }
            let path = dir.join(COPIES_DIR).join(format!("{}.{ext}", d.name));
            needed = needed.saturating_add(m.allocated.max(1));
            set_disk_path(&mut doc, &d.name, &path)?;
            copied.push(d.name.clone());
            make.push((path, ext.to_string(), m.virtual_size));
        }
        if !make.is_empty() {
            let root = self.cfg.state_dir.join("vms");
            let free = free_bytes(&root).map_err(|e| {
                SupervisorError::Refused(format!("free space of {}: {e}", root.display()))
            })?;
            if free < needed.saturating_add(SPARE_BYTES) {
                return Err(SupervisorError::Refused(format!(
                    "no room for the disks' copies on this host: {} needed in {}, {} free",
                    needed.saturating_add(SPARE_BYTES),
                    root.display(),
                    free
                )));
            }
        }
        Ok(IncomingStorage {
            spec_toml: toml::to_string(&doc)
                .map_err(|e| SupervisorError::Refused(format!("rewriting the spec: {e}")))?,
            copied,
            make,
        })
    }

    /// Makes the empty copies (the VM's directory is created 0700 here).
    pub(super) async fn make_incoming_copies(
        &self,
        plan: &IncomingStorage,
    ) -> Result<(), SupervisorError> {
        let qemu_img = self.qemu_img();
        for (path, format, size) in &plan.make {
            let parent = path.parent().expect("a copy lives in a directory");
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(super::error::io_err(format!(
                    "creating {}",
                    parent.display()
                )))?;
            let out = tokio::process::Command::new(&qemu_img)
                .args(["create", "-q", "-f", format])
                .arg(path)
                .arg(size.to_string())
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .map_err(super::error::io_err(format!(
                    "running {}",
                    qemu_img.display()
                )))?;
            if !out.status.success() {
                return Err(SupervisorError::Refused(format!(
                    "making {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(super::error::io_err(format!("chmod {}", path.display())))?;
        }
        Ok(())
    }

    /// Starts the destination QEMU's NBD server on `host` (a free port) and
    /// exports the copies, writable; answers with the server's address.
    pub(super) async fn export_incoming_copies(
        &self,
        qmp: &QmpClient,
        host: &str,
        copied: &[String],
        tls: bool,
        authz: bool,
    ) -> Result<StorageCopyTarget, String> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let mut last = String::new();
        let mut port = 0;
        for _ in 0..5 {
            // QEMU's NBD server cannot be asked for port 0 and say which
            // it got: take a free one and hand it over (libvirt keeps a
            // port range for the same reason); a race is retried.
            port = std::net::TcpListener::bind((bare, 0))
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("finding a free port on {bare}: {e}"))?
                .port();
            let mut args = json!({
                "addr": { "type": "inet", "data": { "host": bare, "port": port.to_string() } },
            });
            if tls {
                args["tls-creds"] = json!(super::migrate::TLS_OBJECT);
                if authz {
                    args["tls-authz"] = json!(AUTHZ_OBJECT);
                }
            }
            match qmp.execute_raw("nbd-server-start", args, QMP_CALL).await {
                Ok(_) => {
                    last.clear();
                    break;
                }
                Err(e) => last = format!("nbd-server-start: {e}"),
            }
        }
        if !last.is_empty() {
            return Err(last);
        }
        for disk in copied {
            qmp.execute_raw(
                "block-export-add",
                json!({
                    "type": "nbd",
                    "id": mirror_node(disk),
                    "node-name": tandem_vmspec::disk_node_name(disk),
                    "name": disk,
                    "writable": true,
                }),
                QMP_CALL,
            )
            .await
            .map_err(|e| format!("exporting disk `{disk}`: {e}"))?;
        }
        let host = if bare.contains(':') {
            format!("[{bare}]")
        } else {
            bare.to_string()
        };
        info!(%host, port, disks = ?copied, tls, authz, "serving the disks' copies over NBD");
        Ok(StorageCopyTarget {
            nbd: format!("{host}:{port}"),
            disks: copied.to_vec(),
        })
    }

    /// This host's certificate name, when it has a cluster identity.
    pub(super) fn identity_name(&self) -> Option<String> {
        let dir = self.cfg.identity_dir.as_ref()?;
        tandem_pki::Identity::load(dir)
            .ok()
            .map(|id| id.name().to_string())
    }
}

/// The destination's `authz-list` object: only the certificate of the
/// host named `source` (a host certificate of the cluster, which the
/// credentials' CA check already requires) may connect.
pub(super) fn authz_object(source: &str) -> Value {
    // QEMU matches the DN as GnuTLS prints it: most significant RDN first
    // on this GnuTLS (`O=tandem:<cluster>,OU=host,CN=host-a`), the reverse
    // (RFC 4514) on others. A name holds no `,`, so neither pattern
    // admits another host.
    let rule = |pattern: String| json!({ "match": pattern, "policy": "allow", "format": "glob" });
    json!({
        "qom-type": "authz-list",
        "id": AUTHZ_OBJECT,
        "policy": "deny",
        "rules": [
            rule(format!("*,OU=host,CN={source}")),
            rule(format!("CN={source},OU=host,*")),
        ],
    })
}

/// The source's mirrors into the destination's NBD server.
pub(super) struct StorageMirror {
    disks: Vec<String>,
    /// The NBD server (host, port), when this tandemd connected to it (an
    /// adopted mirror's is not known).
    server: Option<(String, u16)>,
}

/// Where the mirrors are.
pub(super) struct MirrorProgress {
    pub done: u64,
    pub total: u64,
    /// Every copy has caught up and is kept in step by every write.
    pub synced: bool,
}

impl StorageMirror {
    /// Connects to the destination's exports and starts one mirror per
    /// disk; on any failure undoes what it started.
    pub async fn start(
        qmp: &QmpClient,
        target: &StorageCopyTarget,
        tls: Option<(&str, &str)>,
        speed_bps: Option<u64>,
    ) -> Result<StorageMirror, String> {
        let (host, port) = target
            .nbd
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .ok_or_else(|| format!("`{}` is not HOST:PORT", target.nbd))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut started = StorageMirror {
            disks: Vec::new(),
            server: port.parse().ok().map(|p| (host.to_string(), p)),
        };
        for disk in &target.disks {
            let node = mirror_node(disk);
            let mut nbd = json!({
                "driver": "nbd",
                "node-name": node,
                "server": { "type": "inet", "host": host, "port": port },
                "export": disk,
            });
            if let Some((creds, peer)) = tls {
                nbd["tls-creds"] = json!(creds);
                nbd["tls-hostname"] = json!(peer);
            }
            if let Err(e) = qmp.execute_raw("blockdev-add", nbd, QMP_CALL).await {
                started.abandon(qmp).await;
                return Err(format!(
                    "connecting to the destination's copy of disk `{disk}`: {e}"
                ));
            }
            let mut mirror = json!({
                "job-id": node,
                "device": tandem_vmspec::disk_node_name(disk),
                "target": node,
                "sync": "full",
                "copy-mode": "write-blocking",
                "auto-dismiss": true,
            });
            if let Some(b) = speed_bps {
                // The operator's --bandwidth bounds the disks' copy too
                // (the memory stream runs only after it).
                mirror["speed"] = json!(b);
            }
            if let Err(e) = qmp.execute_raw("blockdev-mirror", mirror, QMP_CALL).await {
                let _ = qmp
                    .execute_raw("blockdev-del", json!({ "node-name": node }), QMP_CALL)
                    .await;
                started.abandon(qmp).await;
                return Err(format!("mirroring disk `{disk}`: {e}"));
            }
            started.disks.push(disk.clone());
        }
        Ok(started)
    }

    /// The mirrors a previous tandemd started on this QEMU (block jobs
    /// named as [`mirror_node`] names them), if any.
    pub async fn adopt(qmp: &QmpClient) -> Result<Option<StorageMirror>, String> {
        let jobs = qmp
            .execute_raw("query-block-jobs", json!({}), QMP_CALL)
            .await
            .map_err(|e| format!("query-block-jobs: {e}"))?;
        let disks: Vec<String> = jobs
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|j| j.get("device").and_then(Value::as_str))
                    .filter_map(|d| d.strip_prefix("migrate-"))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Ok((!disks.is_empty()).then_some(StorageMirror {
            disks,
            server: None,
        }))
    }

    /// Reads the mirrors; an error when one has failed or vanished.
    pub async fn progress(&self, qmp: &QmpClient) -> Result<MirrorProgress, String> {
        let jobs = qmp
            .execute_raw("query-block-jobs", json!({}), QMP_CALL)
            .await
            .map_err(|e| format!("query-block-jobs: {e}"))?;
        let mut p = MirrorProgress {
            done: 0,
            total: 0,
            synced: true,
        };
        for disk in &self.disks {
            let id = mirror_node(disk);
            let job = jobs
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|j| j.get("device").and_then(Value::as_str) == Some(&id))
                })
                .ok_or_else(|| format!("the copy of disk `{disk}` stopped"))?;
            let io = job.get("io-status").and_then(Value::as_str).unwrap_or("ok");
            if io != "ok" {
                return Err(format!("the copy of disk `{disk}` failed: I/O status {io}"));
            }
            let status = job.get("status").and_then(Value::as_str).unwrap_or("");
            if matches!(status, "aborting" | "concluded" | "null") {
                return Err(format!("the copy of disk `{disk}` ended ({status})"));
            }
            let n = |k: &str| job.get(k).and_then(Value::as_u64).unwrap_or(0);
            p.done = p.done.saturating_add(n("offset").min(n("len")));
            p.total = p.total.saturating_add(n("len"));
            let b = |k: &str| job.get(k).and_then(Value::as_bool).unwrap_or(false);
            p.synced &= b("ready") && b("actively-synced");
        }
        Ok(p)
    }

    /// After the memory stream completed (the guest is stopped): checks
    /// that every copy is in step, then ends the mirrors (a caught-up
    /// mirror asked to cancel completes) and removes the NBD clients.
    pub async fn complete(self, qmp: &QmpClient) -> Result<(), String> {
        let p = self.progress(qmp).await?;
        if !p.synced {
            let e = "a disk copy was not in step when the memory stream completed".to_string();
            self.abandon(qmp).await;
            return Err(e);
        }
        self.end(qmp, false).await
    }

    /// Stops the mirrors at once and removes the NBD clients (the
    /// destination's partial copies go with its VM).
    ///
    /// QEMU's NBD connections are cut first: over a dead link their
    /// writes in flight would be retried by TCP for many minutes, and
    /// cancelling the jobs or removing the clients waits for them with
    /// QEMU's main loop held (measured: `blockdev-del` still unanswered
    /// after 10 s, the guest's own writes blocked by the write-blocking
    /// mirror all along). A cut connection fails those writes at once.
    pub async fn abandon(self, qmp: &QmpClient) {
        if let Some((host, port)) = &self.server {
            cut_connections(host, *port).await;
        }
        if let Err(e) = self.end(qmp, true).await {
            warn!("ending the disk copies: {e}");
        }
    }

    async fn end(&self, qmp: &QmpClient, force: bool) -> Result<(), String> {
        for disk in &self.disks {
            let id = mirror_node(disk);
            if let Err(e) = qmp
                .execute_raw(
                    "block-job-cancel",
                    json!({ "device": id, "force": force }),
                    QMP_CALL,
                )
                .await
            {
                warn!(disk = %disk, "block-job-cancel: {e}");
            }
        }
        let deadline = Instant::now() + MIRROR_END;
        loop {
            let jobs = qmp
                .execute_raw("query-block-jobs", json!({}), QMP_CALL)
                .await
                .map_err(|e| format!("query-block-jobs: {e}"))?;
            let left = self.disks.iter().any(|d| {
                let id = mirror_node(d);
                jobs.as_array().is_some_and(|a| {
                    a.iter()
                        .any(|j| j.get("device").and_then(Value::as_str) == Some(&id))
                })
            });
            if !left {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("the disk copies did not end within {MIRROR_END:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for disk in &self.disks {
            let node = mirror_node(disk);
            if let Err(e) = qmp
                .execute_raw("blockdev-del", json!({ "node-name": node }), QMP_CALL)
                .await
            {
                warn!(disk = %disk, "removing the NBD client: {e}");
            }
        }
        Ok(())
    }
}

/// Destroys this host's TCP connections to `host:port` (`ss -K`,
/// SOCK_DESTROY): only the abandoned copies' NBD clients talk to that
/// server. Best effort, bounded: a kernel without
/// CONFIG_INET_DIAG_DESTROY leaves them, and the cancel waits as before.
async fn cut_connections(host: &str, port: u16) {
    let ss = tokio::process::Command::new("ss")
        .args(["-K", "-t", "dst", host, "dport", "=", &port.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(5), ss).await {
        Ok(Ok(st)) if st.success() => {
            info!(%host, port, "cut the abandoned disk copies' connections")
        }
        Ok(Ok(st)) => warn!(%host, port, "ss -K: {st}"),
        Ok(Err(e)) => warn!(%host, port, "ss -K (install iproute2): {e}"),
        Err(_) => warn!(%host, port, "ss -K did not finish within 5 s"),
    }
}

fn probe_path(vm: &str, disk: &Path, nonce: &str) -> Option<PathBuf> {
    Some(disk.parent()?.join(format!("{PROBE_PREFIX}{vm}-{nonce}")))
}

/// Writes a probe beside `disk`; `None` (copy the disk) if it cannot.
fn write_probe(vm: &str, disk: &Path) -> Option<StorageProbe> {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let path = probe_path(vm, disk, &nonce)?;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, nonce.as_bytes())?;
            f.sync_all()
        });
    match written {
        Ok(()) => {
            // A destination reads (and removes) it within the migration's
            // first steps; one that never does (it refused) leaves it to
            // this timer.
            let stale = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(PROBE_LIFETIME).await;
                let _ = std::fs::remove_file(stale);
            });
            Some(StorageProbe {
                path: path.display().to_string(),
                nonce,
            })
        }
        Err(e) => {
            warn!(path = %path.display(), "cannot write a storage probe ({e}); the disk will be copied");
            None
        }
    }
}

/// The destination reads a probe: the same file, beside the same disk
/// path, holding the same nonce. It removes what it read.
fn read_probe(probe: &StorageProbe, disk: &Path) -> bool {
    let path = Path::new(&probe.path);
    let expected = probe_path_of(disk, path);
    if !expected || !disk.is_file() {
        return false;
    }
    match std::fs::read(path) {
        Ok(b) if b == probe.nonce.as_bytes() => {
            let _ = std::fs::remove_file(path);
            true
        }
        _ => false,
    }
}

/// A probe path names a file beside `disk` with the probe prefix (so a
/// request cannot point the destination at any other file).
fn probe_path_of(disk: &Path, probe: &Path) -> bool {
    probe.parent() == disk.parent()
        && probe
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(PROBE_PREFIX))
}

/// Removes every probe of `vm` the source left beside its disks.
pub(super) fn remove_probes(vm: &Vm) {
    let prefix = format!("{PROBE_PREFIX}{}-", vm.name);
    let rec = vm.record();
    let mut dirs: Vec<&Path> = rec
        .spec
        .disks
        .iter()
        .filter_map(|d| d.path.parent())
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn set_disk_path(doc: &mut toml::Table, disk: &str, path: &Path) -> Result<(), SupervisorError> {
    let entry = doc
        .get_mut("disks")
        .and_then(toml::Value::as_array_mut)
        .and_then(|a| {
            a.iter_mut()
                .find(|d| d.get("name").and_then(toml::Value::as_str) == Some(disk))
        })
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| {
            SupervisorError::Refused(format!("the spec has no table for disk `{disk}`"))
        })?;
    entry.insert(
        "path".into(),
        toml::Value::String(path.display().to_string()),
    );
    Ok(())
}

fn free_bytes(path: &Path) -> nix::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path)?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_must_lie_beside_its_disk() {
        let disk = Path::new("/srv/images/a.qcow2");
        assert!(probe_path_of(
            disk,
            Path::new("/srv/images/.tandem-migration-probe-vm-1")
        ));
        assert!(!probe_path_of(disk, Path::new("/etc/shadow")));
        assert!(!probe_path_of(
            disk,
            Path::new("/srv/other/.tandem-migration-probe-vm-1")
        ));
        assert!(!probe_path_of(disk, Path::new("/srv/images/a.qcow2")));
    }

    #[test]
    fn only_the_copied_disks_path_changes() {
        let mut doc: toml::Table = toml::from_str(
            "name = \"v\"\n[[disks]]\nname = \"a\"\npath = \"/x/a\"\n[[disks]]\nname = \"b\"\npath = \"/x/b\"\n",
        )
        .unwrap();
        set_disk_path(&mut doc, "b", Path::new("/state/vms/v/disks/b.qcow2")).unwrap();
        let disks = doc["disks"].as_array().unwrap();
        assert_eq!(disks[0]["path"].as_str(), Some("/x/a"));
        assert_eq!(
            disks[1]["path"].as_str(),
            Some("/state/vms/v/disks/b.qcow2")
        );
        assert!(set_disk_path(&mut doc, "c", Path::new("/y")).is_err());
    }

    #[test]
    fn the_authz_rule_names_the_source_host_only() {
        let o = authz_object("host-a");
        assert_eq!(o["policy"], "deny");
        assert_eq!(o["rules"][0]["match"], "*,OU=host,CN=host-a");
        assert_eq!(o["rules"][1]["match"], "CN=host-a,OU=host,*");
    }
}
