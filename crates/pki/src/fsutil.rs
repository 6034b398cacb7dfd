//! Files that hold keys: created with their final mode, written whole,
//! fsynced, and either never overwritten (CA, backups) or replaced atomically.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::PkiError;

/// Mode of files holding a private key.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of files holding only certificates.
pub(crate) const CERT_MODE: u32 = 0o644;
/// Mode of directories holding keys.
pub(crate) const DIR_MODE: u32 = 0o700;

/// No PEM file of ours comes near this; a bigger one is not ours.
const MAX_READ: u64 = 1 << 20;

/// Creates `dir` (and its parents) and sets it to 0700.
pub(crate) fn private_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|e| PkiError::io(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(|e| PkiError::io(dir, e))
}

/// Reads a small text file.
pub(crate) fn read_text(path: &Path) -> Result<String, PkiError> {
    let f = File::open(path).map_err(|e| PkiError::io(path, e))?;
    let mut buf = Vec::new();
    f.take(MAX_READ + 1)
        .read_to_end(&mut buf)
        .map_err(|e| PkiError::io(path, e))?;
    if buf.len() as u64 > MAX_READ {
        return Err(PkiError::Pem {
            what: path.display().to_string(),
            reason: format!("larger than {MAX_READ} bytes"),
        });
    }
    String::from_utf8(buf).map_err(|_| PkiError::Pem {
        what: path.display().to_string(),
        reason: "not text (invalid UTF-8)".into(),
    })
}

/// Reads a file holding a private key, refusing one that group or others
/// may read (as ssh does).
pub(crate) fn read_secret(path: &Path) -> Result<String, PkiError> {
    let meta = fs::metadata(path).map_err(|e| PkiError::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    read_text(path)
}

fn temp_path(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp.{}.{seq}", std::process::id()))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PkiError::io(dir, e))
}

/// Writes `bytes` to a fresh temporary file beside `path` with `mode`, fsynced.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, PkiError> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have taken bits away; set exactly what we mean.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(PkiError::io(path, e))
        }
    }
}

/// Creates `path` with `bytes` and `mode`; fails with
/// [`PkiError::AlreadyExists`] if it exists. Never leaves a partial `path`.
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = write_temp(path, bytes, mode)?;
    // link(2) refuses to replace an existing name: an atomic create-if-absent
    // of a file that already has all its content.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_dir(parent_of(path)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(PkiError::AlreadyExists(path.to_path_buf()))
        }
        Err(e) => Err(PkiError::io(path, e)),
    }
}

/// Replaces `path` atomically with `bytes` and `mode`: readers see the old
/// file or the new one, never a mix, even across a crash.
pub(crate) fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = write_temp(path, bytes, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(PkiError::io(path, e));
    }
    sync_dir(parent_of(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_new_refuses_to_overwrite_and_sets_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_new(&p, b"one", KEY_MODE).unwrap();
        assert!(matches!(
            write_new(&p, b"two", KEY_MODE),
            Err(PkiError::AlreadyExists(_))
        ));
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary files left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn replace_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c");
        replace(&p, b"one", CERT_MODE).unwrap();
        replace(&p, b"two", CERT_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn read_secret_refuses_open_modes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        replace(&p, b"x", 0o640).unwrap();
        assert!(matches!(
            read_secret(&p),
            Err(PkiError::InsecurePermissions { .. })
        ));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&p).unwrap(), "x");
    }
}
