//! Small file and process helpers.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

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

pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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

    #[test]
    fn own_process_matches_and_bogus_does_not() {
        let me = std::process::id();
        assert!(process_matches(me, ""));
        assert!(!process_matches(me, "definitely-not-in-cmdline-\u{1}"));
        assert!(!process_matches(u32::MAX - 1, ""));
    }
}
