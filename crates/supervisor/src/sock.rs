//! Unix sockets with explicit modes, and who is at the other end.
//!
//! A socket's mode must not depend on the umask, and binding must never
//! delete something that is not a stale socket. [`bind_unix`] binds in a
//! private staging directory (0700) beside the target, sets the socket's
//! mode and group there, and renames it into place: the socket appears at
//! its path already with its final mode, so there is no moment in which
//! others could connect. [`peer_groups`] completes `SO_PEERCRED` (one uid,
//! one gid) with the peer's supplementary groups (`SO_PEERGROUPS`).

use std::io::{Error, ErrorKind};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Who may use a socket: its mode (e.g. 0o600) and, if set, its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPerms {
    pub mode: u32,
    pub group: Option<u32>,
}

impl SocketPerms {
    /// Only the owner (0600).
    pub const PRIVATE: SocketPerms = SocketPerms {
        mode: 0o600,
        group: None,
    };
}

/// Removes a stale socket at `path` so it can be bound again. Anything
/// else there (a file, a directory, a symlink, even to a socket) is
/// refused and left alone: binding must not delete what it did not make.
pub fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(m) => Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket ({}); refusing to remove it",
                path.display(),
                describe(&m.file_type())
            ),
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn describe(t: &std::fs::FileType) -> &'static str {
    if t.is_symlink() {
        "a symlink"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a socket"
    }
}

/// Binds a listening unix socket at `path` with exactly `perms`, replacing
/// a stale socket there (but nothing else, see [`remove_stale_socket`]).
/// The caller makes sure no live server still uses a socket at `path`.
pub fn bind_unix(path: &Path, perms: SocketPerms) -> std::io::Result<UnixListener> {
    remove_stale_socket(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let stage = dir.join(format!(".tandem-{}", std::process::id()));
    match std::fs::DirBuilder::new().mode(0o700).create(&stage) {
        Ok(()) => {}
        // Left behind by a crash of a process with our pid: ours to reuse
        // only if it is a real directory of ours.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(&stage)?;
            if !m.is_dir()
                || std::os::unix::fs::MetadataExt::uid(&m) != nix::unistd::geteuid().as_raw()
            {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} is in the way", stage.display()),
                ));
            }
        }
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(&stage, std::fs::Permissions::from_mode(0o700))?;
    let staged = stage.join("s");
    let _ = std::fs::remove_file(&staged);
    let bound = (|| {
        let listener = UnixListener::bind(&staged)?;
        if let Some(gid) = perms.group {
            std::os::unix::fs::chown(&staged, None, Some(gid))?;
        }
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(perms.mode))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&stage);
    bound
}

/// Creates `dir` (and missing parents) for sockets: `dir` itself with
/// exactly `mode` and, if set, `group`, whatever the umask. A directory
/// that already exists is left as it is (it may be `/run` or `/tmp`).
/// Returns whether it was created.
pub fn create_socket_dir(dir: &Path, mode: u32, group: Option<u32>) -> std::io::Result<bool> {
    if dir.as_os_str().is_empty() || std::fs::symlink_metadata(dir).is_ok() {
        return Ok(false);
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)?;
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    }
    if let Some(gid) = group {
        std::os::unix::fs::chown(dir, None, Some(gid))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    Ok(true)
}

/// A group's id, from its name or its number.
pub fn group_id(group: &str) -> std::io::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(Error::new(
            ErrorKind::NotFound,
            format!("no group named `{group}`"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// The supplementary groups of the process at the other end of a
/// connected unix socket, as they were when it connected
/// (`SO_PEERGROUPS`, Linux 4.13).
pub fn peer_groups(sock: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    use nix::libc;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..4 {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`,
        // which has exactly that many, and stores the size it needs (or
        // wrote) in `len`; `sock` is a descriptor that stays open for the
        // call (it is borrowed).
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n.min(groups.len()));
            return Ok(groups);
        }
        let e = Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(e);
        }
        groups.resize(n, 0);
    }
    Err(Error::other("the peer's group list kept growing"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_socket_gets_its_mode_whatever_was_there() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("api.sock");
        let l = bind_unix(&p, SocketPerms::PRIVATE).unwrap();
        assert_eq!(mode(&p), 0o600);
        // Served at its final path; the staging directory is gone.
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        let (_s, _) = l.accept().unwrap();
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["api.sock"]);
        drop(l);
        // A stale socket is replaced; the group is set.
        let gid = nix::unistd::getegid().as_raw();
        let _l = bind_unix(
            &p,
            SocketPerms {
                mode: 0o660,
                group: Some(gid),
            },
        )
        .unwrap();
        assert_eq!(mode(&p), 0o660);
        assert_eq!(std::fs::metadata(&p).unwrap().gid(), gid);
    }

    /// Binding never deletes what is not a socket: a file, a directory, a
    /// symlink (even one to a socket).
    #[test]
    fn binding_refuses_to_remove_what_is_not_a_socket() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, "precious").unwrap();
        let e = bind_unix(&file, SocketPerms::PRIVATE).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");

        let sub = d.path().join("dir");
        std::fs::create_dir(&sub).unwrap();
        assert!(bind_unix(&sub, SocketPerms::PRIVATE).is_err());
        assert!(sub.is_dir());

        let sock = d.path().join("real.sock");
        let _l = bind_unix(&sock, SocketPerms::PRIVATE).unwrap();
        let link = d.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let e = bind_unix(&link, SocketPerms::PRIVATE).unwrap_err();
        assert!(e.to_string().contains("a symlink"), "{e}");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    }

    #[test]
    fn socket_dirs_are_created_with_their_mode_and_existing_ones_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("run").join("tandem");
        assert!(create_socket_dir(&dir, 0o750, None).unwrap());
        assert_eq!(mode(&dir), 0o750);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!create_socket_dir(&dir, 0o700, None).unwrap());
        assert_eq!(mode(&dir), 0o755);
    }

    #[test]
    fn groups_are_found_by_name_or_number() {
        assert_eq!(group_id("0").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        let e = group_id("no-such-group-tandem").unwrap_err();
        assert!(e.to_string().contains("no group named"), "{e}");
    }

    #[test]
    fn peer_groups_are_this_processs_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        let mut got = peer_groups(a.as_fd()).unwrap();
        let mut mine: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        got.sort_unstable();
        mine.sort_unstable();
        assert_eq!(got, mine);
    }
}
