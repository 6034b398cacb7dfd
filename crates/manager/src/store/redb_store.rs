//! The default store: one redb file (`manager.redb`, mode 0600) in the
//! manager's state directory.
//!
//! Why redb rather than SQLite through rusqlite: redb is pure Rust (no C
//! library to build or link, nothing for `cargo build` to need beyond
//! crates.io), a single file with ACID transactions (copy-on-write B-trees,
//! a checksummed commit, `fsync` before a commit returns), and its data
//! model is exactly what this store is: an ordered key → bytes map. We need
//! no SQL, no schema migrations in SQL, no query planner; the etcd backend
//! that follows has the same key/revision shape. redb also takes an
//! exclusive lock on the file, so a second manager on the same state
//! directory fails at start with a clear error instead of sharing it.
//!
//! Layout: table `kv` maps a key to `(revision, value)`; table `meta` holds
//! `revision` (the store-wide counter) and `format` (this file's layout
//! version, refused when newer than this code knows).

// redb's own error type is large; it lives only between a redb call and
// `map_error`, which turns it into a `StoreError` at once.
#![allow(clippy::result_large_err)]

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};

use super::{check_key, check_prefix, CasOutcome, Entry, Expect, Revision, Store, StoreError};

/// The database's file name in the manager's state directory.
pub const DB_FILE: &str = "manager.redb";

const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_FORMAT: &str = "format";
/// The layout described above.
const FORMAT: u64 = 1;
/// redb's default page cache is 1 GiB; the manager's data is small.
const CACHE_BYTES: usize = 16 << 20;

/// The embedded store. Cheap to clone; every clone is the same database.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedbStore({})", self.path.display())
    }
}

impl RedbStore {
    /// Opens the database at `path`, creating it (mode 0600) if it does not
    /// exist. A database another process (or this one) holds open is
    /// [`StoreError::Locked`]; a damaged file is [`StoreError::Corrupt`].
    /// An existing file readable by group or others is tightened to 0600.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let shown = path.display().to_string();
        let io = |e: std::io::Error| StoreError::Io {
            path: shown.clone(),
            detail: e.to_string(),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %shown, mode = format!("{:o}", meta.permissions().mode() & 0o777), "database file was readable by others; setting it to 0600");
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
        }
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create_with_file_format_v3(true)
            .create_file(file)
            .map_err(|e| map_db_error(&shown, e))?;
        let store = RedbStore {
            db: Arc::new(db),
            path: Arc::new(path.to_path_buf()),
        };
        store.init()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the tables on a new file and checks the format of an old one.
    fn init(&self) -> Result<(), StoreError> {
        let err = |e: redb::Error| map_error(&self.path, e);
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| err(e.into()))?;
            let format = meta
                .get(META_FORMAT)
                .map_err(|e| err(e.into()))?
                .map(|v| v.value());
            match format {
                None => {
                    meta.insert(META_FORMAT, FORMAT)
                        .map_err(|e| err(e.into()))?;
                    meta.insert(META_REVISION, 0).map_err(|e| err(e.into()))?;
                }
                Some(f) if f > FORMAT => {
                    return Err(StoreError::TooNew {
                        path: self.path.display().to_string(),
                        found: f,
                        known: FORMAT,
                    })
                }
                Some(_) => {}
            }
            tx.open_table(KV).map_err(|e| err(e.into()))?;
        }
        tx.commit().map_err(|e| err(e.into()))
    }

    /// Runs `f` on a blocking thread: redb calls block on `fsync`.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &Path) -> Result<T, redb::Error> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let path = Arc::clone(&self.path);
        tokio::task::spawn_blocking(move || f(&db, &path).map_err(|e| map_error(&path, e)))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    /// The same operations, synchronously (for tools that run without a
    /// runtime, and for tests).
    pub fn get_sync(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        check_key(key)?;
        get_in(&self.db, key).map_err(|e| map_error(&self.path, e))
    }

    pub fn list_sync(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        check_prefix(prefix)?;
        list_in(&self.db, prefix).map_err(|e| map_error(&self.path, e))
    }

    pub fn put_sync(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        check_key(key)?;
        write_in(&self.db, key, None, Some(value))
            .map(|o| match o {
                CasOutcome::Swapped { revision } => revision,
                CasOutcome::Conflict { .. } => 0,
            })
            .map_err(|e| map_error(&self.path, e))
    }
}

fn get_in(db: &Database, key: &str) -> Result<Option<Entry>, redb::Error> {
    let tx = db.begin_read()?;
    let kv = tx.open_table(KV)?;
    Ok(kv.get(key)?.map(|v| {
        let (revision, value) = v.value();
        Entry {
            key: key.to_string(),
            value: value.to_vec(),
            revision,
        }
    }))
}

fn list_in(db: &Database, prefix: &str) -> Result<Vec<Entry>, redb::Error> {
    let tx = db.begin_read()?;
    let kv = tx.open_table(KV)?;
    let mut out = Vec::new();
    for item in kv.range(prefix..)? {
        let (k, v) = item?;
        let key = k.value();
        if !key.starts_with(prefix) {
            break;
        }
        let (revision, value) = v.value();
        out.push(Entry {
            key: key.to_string(),
            value: value.to_vec(),
            revision,
        });
    }
    Ok(out)
}

/// One write transaction: check `expect` (if any), then write or delete.
/// The store revision is bumped only when something is written.
fn write_in(
    db: &Database,
    key: &str,
    expect: Option<Expect>,
    new: Option<Vec<u8>>,
) -> Result<CasOutcome, redb::Error> {
    let tx = db.begin_write()?;
    let outcome = {
        let mut kv = tx.open_table(KV)?;
        let current = kv.get(key)?.map(|v| {
            let (revision, value) = v.value();
            Entry {
                key: key.to_string(),
                value: value.to_vec(),
                revision,
            }
        });
        let matches = match (expect, &current) {
            (None, _) => true,
            (Some(Expect::Absent), None) => true,
            (Some(Expect::Revision(r)), Some(c)) => c.revision == r,
            _ => false,
        };
        if !matches {
            CasOutcome::Conflict { current }
        } else if new.is_none() && current.is_none() {
            // Deleting what is not there writes nothing.
            CasOutcome::Swapped { revision: 0 }
        } else {
            let mut meta = tx.open_table(META)?;
            let revision = meta
                .get(META_REVISION)?
                .map(|v| v.value())
                .unwrap_or(0)
                .saturating_add(1);
            meta.insert(META_REVISION, revision)?;
            match &new {
                Some(value) => {
                    kv.insert(key, (revision, value.as_slice()))?;
                }
                None => {
                    kv.remove(key)?;
                }
            }
            CasOutcome::Swapped { revision }
        }
    };
    if outcome.swapped() {
        tx.commit()?;
    } else {
        tx.abort()?;
    }
    Ok(outcome)
}

fn map_db_error(path: &str, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
            path: path.to_string(),
        },
        other => map_error(Path::new(path), other.into()),
    }
}

fn map_error(path: &Path, e: redb::Error) -> StoreError {
    let path = path.display().to_string();
    match e {
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked { path },
        redb::Error::Corrupted(detail) => StoreError::Corrupt { path, detail },
        redb::Error::UpgradeRequired(v) => StoreError::Corrupt {
            path,
            detail: format!("file format {v} needs an upgrade this build cannot do"),
        },
        redb::Error::Io(io) => {
            // redb reports a file that is not a database as an I/O error
            // with InvalidData.
            if io.kind() == std::io::ErrorKind::InvalidData {
                StoreError::Corrupt {
                    path,
                    detail: io.to_string(),
                }
            } else {
                StoreError::Io {
                    path,
                    detail: io.to_string(),
                }
            }
        }
        other => StoreError::Backend(format!("{path}: {other}")),
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        check_key(key)?;
        let key = key.to_string();
        self.blocking(move |db, _| get_in(db, &key)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        check_key(key)?;
        let key = key.to_string();
        let out = self
            .blocking(move |db, _| write_in(db, &key, None, Some(value)))
            .await?;
        match out {
            CasOutcome::Swapped { revision } => Ok(revision),
            CasOutcome::Conflict { .. } => Err(StoreError::Backend(
                "an unconditional put reported a conflict".into(),
            )),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let key = key.to_string();
        let out = self
            .blocking(move |db, _| write_in(db, &key, None, None))
            .await?;
        Ok(matches!(out, CasOutcome::Swapped { revision } if revision > 0))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        check_prefix(prefix)?;
        let prefix = prefix.to_string();
        self.blocking(move |db, _| list_in(db, &prefix)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Result<CasOutcome, StoreError> {
        check_key(key)?;
        let key = key.to_string();
        self.blocking(move |db, _| write_in(db, &key, Some(expect), new))
            .await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.blocking(|db, _| {
            let tx = db.begin_read()?;
            let meta = tx.open_table(META)?;
            Ok(meta.get(META_REVISION)?.map(|v| v.value()).unwrap_or(0))
        })
        .await
    }

    fn describe(&self) -> String {
        format!("redb {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> RedbStore {
        RedbStore::open(&dir.path().join(DB_FILE)).unwrap()
    }

    #[tokio::test]
    async fn put_get_delete_list() {
        let d = tempfile::tempdir().unwrap();
        let s = open(&d);
        assert_eq!(s.revision().await.unwrap(), 0);
        assert_eq!(s.get("hosts/a").await.unwrap(), None);
        let r1 = s.put("hosts/a", b"A".to_vec()).await.unwrap();
        let r2 = s.put("hosts/b", b"B".to_vec()).await.unwrap();
        let r3 = s.put("tokens/x", b"X".to_vec()).await.unwrap();
        assert!(r1 < r2 && r2 < r3);
        assert_eq!(s.revision().await.unwrap(), r3);
        let a = s.get("hosts/a").await.unwrap().unwrap();
        assert_eq!((a.value.as_slice(), a.revision), (&b"A"[..], r1));

        let hosts = s.list("hosts/").await.unwrap();
        assert_eq!(
            hosts.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["hosts/a", "hosts/b"]
        );
        assert_eq!(s.list("").await.unwrap().len(), 3);
        assert!(s.list("nothing/").await.unwrap().is_empty());
        // A prefix is a byte prefix, not a path component.
        assert_eq!(s.list("hosts/a").await.unwrap().len(), 1);

        assert!(s.delete("hosts/a").await.unwrap());
        assert!(!s.delete("hosts/a").await.unwrap());
        assert_eq!(s.get("hosts/a").await.unwrap(), None);
        // The delete used a revision; the failed one did not.
        assert_eq!(s.revision().await.unwrap(), r3 + 1);
        assert!(s.get("bad key").await.is_err());
    }

    #[tokio::test]
    async fn compare_and_swap() {
        let d = tempfile::tempdir().unwrap();
        let s = open(&d);
        // Create only if absent.
        let CasOutcome::Swapped { revision: r1 } = s
            .compare_and_swap("vms/1", Expect::Absent, Some(b"g1".to_vec()))
            .await
            .unwrap()
        else {
            panic!("create failed")
        };
        let again = s
            .compare_and_swap("vms/1", Expect::Absent, Some(b"other".to_vec()))
            .await
            .unwrap();
        let CasOutcome::Conflict { current: Some(cur) } = again else {
            panic!("{again:?}")
        };
        assert_eq!((cur.value.as_slice(), cur.revision), (&b"g1"[..], r1));

        // Swap at the right revision; a stale revision loses.
        let out = s
            .compare_and_swap("vms/1", Expect::Revision(r1), Some(b"g2".to_vec()))
            .await
            .unwrap();
        let CasOutcome::Swapped { revision: r2 } = out else {
            panic!("{out:?}")
        };
        assert!(r2 > r1);
        let stale = s
            .compare_and_swap("vms/1", Expect::Revision(r1), Some(b"g3".to_vec()))
            .await
            .unwrap();
        assert!(!stale.swapped());
        assert_eq!(s.get("vms/1").await.unwrap().unwrap().value, b"g2");

        // Conditional delete; then the old revision never matches a
        // re-created key (no ABA).
        assert!(s
            .compare_and_swap("vms/1", Expect::Revision(r2), None)
            .await
            .unwrap()
            .swapped());
        assert_eq!(s.get("vms/1").await.unwrap(), None);
        s.put("vms/1", b"new".to_vec()).await.unwrap();
        assert!(!s
            .compare_and_swap("vms/1", Expect::Revision(r2), None)
            .await
            .unwrap()
            .swapped());
        // A conflict on an absent key reports it absent.
        let out = s
            .compare_and_swap("vms/2", Expect::Revision(5), Some(vec![]))
            .await
            .unwrap();
        assert_eq!(out, CasOutcome::Conflict { current: None });
    }

    #[tokio::test]
    async fn reopen_keeps_everything_and_revisions_keep_growing() {
        let d = tempfile::tempdir().unwrap();
        let r;
        {
            let s = open(&d);
            s.put("a", b"1".to_vec()).await.unwrap();
            r = s.put("b", b"2".to_vec()).await.unwrap();
        }
        let s = open(&d);
        assert_eq!(s.get("b").await.unwrap().unwrap().revision, r);
        assert_eq!(s.revision().await.unwrap(), r);
        assert!(s.put("c", vec![]).await.unwrap() > r);
        let mode = std::fs::metadata(d.path().join(DB_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn locked_file_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let _first = open(&d);
        let err = RedbStore::open(&d.path().join(DB_FILE)).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("already running"), "{err}");
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(DB_FILE);
        std::fs::write(&p, vec![0x5a; 64 * 1024]).unwrap();
        let err = RedbStore::open(&p).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { .. } | StoreError::Io { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
    }

    #[test]
    fn loose_permissions_are_tightened() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(DB_FILE);
        drop(RedbStore::open(&p).unwrap());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(RedbStore::open(&p).unwrap());
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn sync_helpers() {
        let d = tempfile::tempdir().unwrap();
        let s = open(&d);
        let r = s.put_sync("k", b"v".to_vec()).unwrap();
        assert_eq!(s.get_sync("k").unwrap().unwrap().revision, r);
        assert_eq!(s.list_sync("").unwrap().len(), 1);
    }
}
