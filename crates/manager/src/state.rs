//! The manager's state directory, `tandem cluster init`, and backup and
//! restore.
//!
//! ```text
//! STATE_DIR/                 0700 (default /var/lib/tandem-manager)
//!   cluster.json             cluster name and id, manager name, listen address
//!   ca/ca.pem, ca/ca.key     the cluster CA (tandem-pki; the key 0600)
//!   identity/identity.pem    the manager's own certificate (role manager), renewed by the manager
//!   manager.redb             the store (0600)
//!   operator/identity.pem    the local administrator's operator certificate
//!   operator/manager.json    where the CLI finds the manager
//! ```
//!
//! A backup is a directory: `ca.backup` (tandem-pki's, encrypted with a
//! passphrase if one is given), `store.json` (every record, see
//! [`crate::api::Dump`]) and `cluster.json`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tandem_pki::{BackupInfo, ClusterCa, Identity, PkiError, Role};

use crate::api::{Dump, DEFAULT_PORT};
use crate::client::ManagerEndpoint;
use crate::clock::unix;
use crate::model::{ClusterRecord, CLUSTER_KEY};
use crate::service::ManagerError;
use crate::store::typed::{encode, Record};
use crate::store::{RedbStore, StoreError, DB_FILE};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/tandem-manager";
pub const CLUSTER_FILE: &str = "cluster.json";
pub const CA_DIR: &str = "ca";
pub const IDENTITY_DIR: &str = "identity";
pub const OPERATOR_DIR: &str = "operator";
/// Beside an identity: where its manager is.
pub const MANAGER_FILE: &str = "manager.json";
/// The manager's own certificate's lifetime; it renews itself at 2/3.
pub const MANAGER_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
pub const OPERATOR_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
pub const BACKUP_CA_FILE: &str = "ca.backup";
pub const BACKUP_STORE_FILE: &str = "store.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Manager(#[from] ManagerError),
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> StateError {
    StateError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// What `cluster.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub cluster_name: String,
    pub cluster_id: String,
    pub manager_name: String,
    /// The address `tandem-manager` listens on when `--listen` is not given.
    pub listen: String,
    /// Unix seconds.
    pub created_at: u64,
}

/// The manager's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join(CLUSTER_FILE)
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root.join(CA_DIR)
    }

    pub fn identity_dir(&self) -> PathBuf {
        self.root.join(IDENTITY_DIR)
    }

    pub fn operator_dir(&self) -> PathBuf {
        self.root.join(OPERATOR_DIR)
    }

    pub fn db_path(&self) -> PathBuf {
        self.root.join(DB_FILE)
    }

    /// Reads `cluster.json`; a missing one says to run `cluster init`.
    pub fn config(&self) -> Result<ClusterConfig, StateError> {
        let p = self.config_path();
        let text = std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StateError::Invalid(format!(
                    "{} is not a manager state directory (no {CLUSTER_FILE}): run `tandem cluster init --state-dir {}` first",
                    self.root.display(),
                    self.root.display()
                ))
            } else {
                io_err(&p, e)
            }
        })?;
        serde_json::from_str(&text).map_err(|e| io_err(&p, e))
    }

    pub fn load_ca(&self) -> Result<ClusterCa, StateError> {
        Ok(ClusterCa::load(&self.ca_dir())?)
    }

    /// Refuses a directory that already holds any part of a manager.
    fn refuse_existing(&self) -> Result<(), StateError> {
        for p in [
            self.config_path(),
            self.ca_dir(),
            self.db_path(),
            self.identity_dir(),
        ] {
            if p.symlink_metadata().is_ok() {
                return Err(StateError::Invalid(format!(
                    "{} already exists: {} already holds a cluster; refusing to overwrite it",
                    p.display(),
                    self.root.display()
                )));
            }
        }
        Ok(())
    }
}

/// Options of `tandem cluster init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub cluster_name: String,
    pub manager_name: String,
    /// Where the manager will listen.
    pub listen: String,
    /// What the local operator's CLI dials (`HOST:PORT`).
    pub advertise: String,
    pub operator_name: String,
    pub operator_validity: Duration,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            cluster_name: "tandem".into(),
            manager_name: "manager".into(),
            listen: format!("0.0.0.0:{DEFAULT_PORT}"),
            advertise: format!("127.0.0.1:{DEFAULT_PORT}"),
            operator_name: "admin".into(),
            operator_validity: OPERATOR_CERT_VALIDITY,
        }
    }
}

/// What `cluster init` made.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    pub state_dir: PathBuf,
    pub cluster_name: String,
    pub cluster_id: String,
    pub manager_name: String,
    pub listen: String,
    pub ca_dir: PathBuf,
    pub operator_identity: PathBuf,
    pub operator_name: String,
    /// Unix seconds.
    pub operator_not_after: u64,
}

/// Creates a directory (and parents) 0700, or tightens an existing one.
pub fn private_dir(p: &Path) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(|e| io_err(p, e))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).map_err(|e| io_err(p, e))
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename,
/// directory fsync) with `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    let dir = path
        .parent()
        .ok_or_else(|| StateError::Invalid(format!("{} has no directory", path.display())))?;
    let name = path
        .file_name()
        .ok_or_else(|| StateError::Invalid(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn write_json<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), StateError> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| io_err(path, e))?;
    text.push(b'\n');
    write_atomic(path, &text, mode)
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    let text = std::fs::read(path).map_err(|e| io_err(path, e))?;
    serde_json::from_slice(&text).map_err(|e| io_err(path, e))
}

fn put_record<T: Record>(store: &RedbStore, key: &str, v: &T) -> Result<(), StateError> {
    store.put_sync(key, encode(v)?)?;
    Ok(())
}

/// Issues and saves an operator certificate, with `manager.json` beside it.
pub fn issue_operator(
    ca: &ClusterCa,
    name: &str,
    validity: Duration,
    out: &Path,
    endpoint: &ManagerEndpoint,
) -> Result<Identity, StateError> {
    let issued = ca.issue(name, Role::Operator, validity)?;
    let id = ca.identity(&issued)?;
    id.save(out)?;
    write_json(&out.join(MANAGER_FILE), endpoint, 0o644)?;
    Ok(id)
}

/// `tandem cluster init`: the CA, the manager's certificate, an operator
/// certificate for the local administrator, the store with its cluster
/// record, and `cluster.json`. Refuses a directory that holds any of them.
pub fn init(dir: &StateDir, opts: &InitOptions) -> Result<InitReport, StateError> {
    tandem_pki::validate_name(&opts.manager_name)?;
    tandem_pki::validate_name(&opts.operator_name)?;
    if opts.manager_name == opts.operator_name {
        return Err(StateError::Invalid(
            "the operator certificate needs another name than the manager's".into(),
        ));
    }
    dir.refuse_existing()?;
    private_dir(dir.root())?;
    let ca = ClusterCa::create(&dir.ca_dir(), &opts.cluster_name)?;
    let manager = ca.issue(&opts.manager_name, Role::Manager, MANAGER_CERT_VALIDITY)?;
    ca.identity(&manager)?.save(&dir.identity_dir())?;
    let now = unix(SystemTime::now());
    let store = RedbStore::open(&dir.db_path())?;
    put_record(
        &store,
        CLUSTER_KEY,
        &ClusterRecord {
            cluster_id: ca.cluster_id().to_string(),
            cluster_name: ca.cluster_name().to_string(),
            created_at: now,
        },
    )?;
    drop(store);
    let endpoint = ManagerEndpoint {
        address: opts.advertise.clone(),
        name: opts.manager_name.clone(),
        cluster_id: ca.cluster_id().to_string(),
    };
    let op = issue_operator(
        &ca,
        &opts.operator_name,
        opts.operator_validity,
        &dir.operator_dir(),
        &endpoint,
    )?;
    let config = ClusterConfig {
        cluster_name: ca.cluster_name().to_string(),
        cluster_id: ca.cluster_id().to_string(),
        manager_name: opts.manager_name.clone(),
        listen: opts.listen.clone(),
        created_at: now,
    };
    write_json(&dir.config_path(), &config, 0o644)?;
    Ok(InitReport {
        state_dir: dir.root().to_path_buf(),
        cluster_name: config.cluster_name,
        cluster_id: config.cluster_id,
        manager_name: config.manager_name,
        listen: config.listen,
        ca_dir: dir.ca_dir(),
        operator_identity: dir.operator_dir(),
        operator_name: opts.operator_name.clone(),
        operator_not_after: unix(op.not_after()),
    })
}

/// The manager's identity from the state directory, re-issued from the CA
/// (and saved) if it is missing, of another cluster, not a manager
/// certificate of `name`, or in the last third of its life. Returns the
/// identity and whether it is new.
pub fn manager_identity(
    dir: &StateDir,
    ca: &ClusterCa,
    name: &str,
) -> Result<(Identity, bool), StateError> {
    let validity = MANAGER_CERT_VALIDITY;
    match Identity::load(&dir.identity_dir()) {
        Ok(id)
            if id.cluster_id() == ca.cluster_id()
                && id.role() == Role::Manager
                && id.name() == name
                && !id.expires_within(validity / 3) =>
        {
            return Ok((id, false))
        }
        Ok(_) => {}
        Err(PkiError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!("the manager's identity is unusable ({e}); issuing a new one");
        }
    }
    let issued = ca.issue(name, Role::Manager, validity)?;
    let id = ca.identity(&issued)?;
    id.save(&dir.identity_dir())?;
    tracing::info!(serial = %id.serial(), "issued the manager a new certificate");
    Ok((id, true))
}

/// Writes `out/ca.backup` (the CA; encrypted if `passphrase`) and
/// `out/cluster.json`. `out` must not exist yet or be empty. The store
/// part is written by [`write_store_backup`].
pub fn backup_ca(
    dir: &StateDir,
    out: &Path,
    passphrase: Option<&str>,
) -> Result<BackupInfo, StateError> {
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| io_err(out, e))?
            .next()
            .is_some()
    {
        return Err(StateError::Invalid(format!(
            "{} exists and is not empty; give a new directory",
            out.display()
        )));
    }
    private_dir(out)?;
    let ca = dir.load_ca()?;
    let info = ca.backup(&out.join(BACKUP_CA_FILE), passphrase)?;
    let config = dir.config()?;
    write_json(&out.join(CLUSTER_FILE), &config, 0o600)?;
    Ok(info)
}

pub fn write_store_backup(out: &Path, dump: &Dump) -> Result<(), StateError> {
    write_json(&out.join(BACKUP_STORE_FILE), dump, 0o600)
}

/// Every record of the store, read from the file directly: works only
/// while no manager runs on it ([`StoreError::Locked`] otherwise).
pub async fn dump_offline(dir: &StateDir) -> Result<Dump, StateError> {
    let store = RedbStore::open(&dir.db_path())?;
    let ca = dir.load_ca()?;
    let now = unix(SystemTime::now());
    Ok(crate::service::dump_store(&store, ca.cluster_id(), now).await?)
}

/// What `cluster restore` made.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub state_dir: PathBuf,
    pub cluster_id: String,
    pub records: usize,
    pub operator_identity: PathBuf,
}

/// `tandem cluster restore`: a new state directory from a backup. The CA
/// comes back as it was (same cluster id, so every host's certificate
/// still verifies); the manager and the local operator get new
/// certificates; the store gets every record back.
pub async fn restore(
    dir: &StateDir,
    from: &Path,
    passphrase: Option<&str>,
    advertise: &str,
    operator_name: &str,
) -> Result<RestoreReport, StateError> {
    dir.refuse_existing()?;
    let config: ClusterConfig = read_json(&from.join(CLUSTER_FILE))?;
    let dump: Dump = read_json(&from.join(BACKUP_STORE_FILE))?;
    if dump.cluster_id != config.cluster_id {
        return Err(StateError::Invalid(format!(
            "{}: the store dump is of cluster {}, the backup's cluster.json of {}",
            from.display(),
            dump.cluster_id,
            config.cluster_id
        )));
    }
    private_dir(dir.root())?;
    let ca = ClusterCa::restore(&from.join(BACKUP_CA_FILE), &dir.ca_dir(), passphrase)?;
    if ca.cluster_id() != config.cluster_id {
        return Err(StateError::Invalid(format!(
            "the CA in the backup is cluster {}, its cluster.json says {}",
            ca.cluster_id(),
            config.cluster_id
        )));
    }
    let store = RedbStore::open(&dir.db_path())?;
    let records = crate::service::load_dump(&store, &dump).await?;
    drop(store);
    let (_id, _) = manager_identity(dir, &ca, &config.manager_name)?;
    let endpoint = ManagerEndpoint {
        address: advertise.to_string(),
        name: config.manager_name.clone(),
        cluster_id: ca.cluster_id().to_string(),
    };
    if dir.operator_dir().join(tandem_pki::IDENTITY_FILE).exists() {
        return Err(StateError::Invalid(format!(
            "{} exists",
            dir.operator_dir().display()
        )));
    }
    issue_operator(
        &ca,
        operator_name,
        OPERATOR_CERT_VALIDITY,
        &dir.operator_dir(),
        &endpoint,
    )?;
    write_json(&dir.config_path(), &config, 0o644)?;
    Ok(RestoreReport {
        state_dir: dir.root().to_path_buf(),
        cluster_id: config.cluster_id,
        records,
        operator_identity: dir.operator_dir(),
    })
}
