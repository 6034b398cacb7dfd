//! Small file and process helpers.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Milliseconds on `CLOCK_BOOTTIME`: monotonic, host-wide (every process
/// on the host reads the same value) and counting suspend. The fence lease
/// is written and enforced on it, so no wall-clock step can move it.
pub fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1000) + (t.tv_nsec() as u64) / 1_000_000)
        .unwrap_or(0)
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes JSON so that a crash at any point leaves either the old or the new
/// file, never a torn one: temp file, fsync, rename, fsync the directory.
pub fn atomic_write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    atomic_write(path, &bytes)
}

/// Replaces `path` with `bytes`, durably: a private temp file (0600, a name
/// no other writer uses), fsync, rename, fsync the directory. Concurrent
/// writers never share a temp file, so the result is one whole write.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_file(path, bytes, true)
}

/// Replaces `path` with `bytes` by rename, without fsync: a reader sees the
/// old or the new content, whole, but a host crash may lose the write. For
/// files that mean nothing after a host crash (the fence lease).
pub fn replace_file_volatile(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_file(path, bytes, false)
}

fn replace_file(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if durable {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = temp_name(path);
    let written = (|| {
        let mut f = create_private_file(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if durable {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A temp name beside `path` that no other writer (thread or process)
/// uses: `.NAME.PID.SEQ.tmp`.
fn temp_name(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Creates a new file only its owner can read or write (0600). Refuses
/// anything already at `path`, a symlink included (`O_CREAT|O_EXCL`, and
/// `O_NOFOLLOW` for good measure), so nobody can hand us a file of theirs.
pub fn create_private_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Copies `from` into a new private file `to` (0600; `to` must not exist).
/// Returns the bytes copied.
pub fn copy_private(from: &Path, to: &Path) -> std::io::Result<u64> {
    let mut src = File::open(from)?;
    let mut dst = create_private_file(to)?;
    std::io::copy(&mut src, &mut dst).inspect_err(|_| {
        let _ = std::fs::remove_file(to);
    })
}

/// Copies `from` over `to` (0600), atomically: a private temp file beside
/// `to`, then a rename. Whatever was at `to` is replaced, never written
/// through (a symlink there is replaced, not followed).
pub fn copy_private_replace(from: &Path, to: &Path) -> std::io::Result<u64> {
    let tmp = temp_name(to);
    let n = copy_private(from, &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, to) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(n)
}

/// Creates a directory only its owner can enter (0700); `parent` must exist.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(path)
}

/// Makes sure `dir` is a private directory of this process's user: created
/// 0700 if missing; if present, it must be a real directory (not a
/// symlink) owned by us, and is set to 0700. A directory someone else made
/// (e.g. pre-created in a world-writable `/dev/shm`) is refused, never
/// used. Its parent must not let others swap it: not writable by others
/// unless sticky (as `/dev/shm` and `/tmp` are).
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let parent = dir.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)?;
    let pm = std::fs::metadata(parent)?;
    if pm.mode() & 0o002 != 0 && pm.mode() & 0o1000 == 0 {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} is writable by everyone without the sticky bit; refusing to keep private files under it",
                parent.display()
            ),
        ));
    }
    match create_private_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(dir)?;
    if !m.file_type().is_dir() {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory (a symlink or file someone put there?); refusing to use it",
                dir.display()
            ),
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by tandemd (uid {me}); refusing to use it (remove it if it is not yours)",
                dir.display(),
                m.uid()
            ),
        ));
    }
    if m.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Sets a directory of ours to 0700 (records and logs of a VM, a
/// checkpoint).
pub fn make_private(dir: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The last `n` lines of a text file, reading at most the last 64 KiB.
pub fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// Reads up to `max` bytes of a file from `offset`.
pub fn read_from(path: &Path, offset: u64, max: usize) -> std::io::Result<(Vec<u8>, u64)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    // A log that was rotated is shorter than the reader's offset: restart.
    let offset = if offset > len { 0 } else { offset };
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.take(max as u64).read_to_end(&mut buf)?;
    let next = offset + buf.len() as u64;
    Ok((buf, next))
}

/// Whether `pid` is a live (non-zombie) process whose command line contains
/// `marker`. Checking the command line guards against a recycled pid.
pub fn process_matches(pid: u32, marker: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised command name, is the state.
        if let Some(rest) = stat.rsplit_once(')') {
            if rest.1.trim_start().starts_with('Z') {
                return false;
            }
        }
    }
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains(marker)
}

/// Live (non-zombie) processes, other than this one, whose command line
/// contains `marker`.
pub fn processes_matching(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && process_matches(pid, marker))
        .collect()
}

/// Sends `sig` to `pid`. Returns false when the process does not exist.
pub fn send_signal(pid: u32, sig: Signal) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // pid is positive, so it never addresses a process group.
    nix::sys::signal::kill(Pid::from_raw(pid), sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_last_nonempty_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "a\nb\n\nc\r\nd\n").unwrap();
        assert_eq!(tail_lines(&p, 2), ["c", "d"]);
        assert_eq!(tail_lines(&p, 10), ["a", "b", "c", "d"]);
        assert!(tail_lines(&d.path().join("none"), 3).is_empty());
    }

    #[test]
    fn read_from_restarts_after_rotation() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        std::fs::write(&p, "hello").unwrap();
        assert_eq!(read_from(&p, 2, 100).unwrap(), (b"llo".to_vec(), 5));
        assert_eq!(read_from(&p, 99, 100).unwrap(), (b"hello".to_vec(), 5));
        assert_eq!(read_from(&p, 0, 2).unwrap(), (b"he".to_vec(), 2));
    }

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        atomic_write_json(&p, &1).unwrap();
        atomic_write_json(&p, &2).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "2");
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn atomic_write_is_private_and_leaves_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        std::thread::scope(|s| {
            for i in 0..8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..50 {
                        atomic_write_json(p, &vec![i; 100]).unwrap();
                    }
                });
            }
        });
        let v: Vec<i32> = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert!(
            v.iter().all(|x| *x == v[0]) && v.len() == 100,
            "torn: {v:?}"
        );
        assert_eq!(mode(&p), 0o600);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["x.json"]);
        replace_file_volatile(&p, b"7").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "7");
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn private_files_refuse_what_is_there() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, "secret").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(
            create_private_file(&link).unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
        let dangling = d.path().join("dangling");
        std::os::unix::fs::symlink(d.path().join("nowhere"), &dangling).unwrap();
        assert!(create_private_file(&dangling).is_err());
        assert!(!d.path().join("nowhere").exists());
        assert!(copy_private(&target, &target).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "secret");

        let copy = d.path().join("copy");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(copy_private(&target, &copy).unwrap(), 6);
        assert_eq!(mode(&copy), 0o600);
        // Replacing goes around a symlink, never through it.
        assert_eq!(copy_private_replace(&copy, &link).unwrap(), 6);
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(mode(&link), 0o600);
    }

    #[test]
    fn private_dirs_are_ours_or_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ram");
        ensure_private_dir(&p).unwrap();
        assert_eq!(mode(&p), 0o700);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&p).unwrap();
        assert_eq!(mode(&p), 0o700);

        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");

        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(ensure_private_dir(&open.join("x")).is_err());
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_private_dir(&open.join("x")).unwrap();
    }

    #[test]
    fn own_process_matches_and_bogus_does_not() {
        let me = std::process::id();
        assert!(process_matches(me, ""));
        assert!(!process_matches(me, "definitely-not-in-cmdline-\u{1}"));
        assert!(!process_matches(u32::MAX - 1, ""));
    }
}
