//! The API's unix sockets, and who may use them (audit M5).
//!
//! - The read-write socket (`--socket`): created 0600 (0660 and the group's
//!   with `--api-group`), in a directory tandemd creates 0700 (0750), modes
//!   set explicitly, never left to the umask. Every connection's peer
//!   (`SO_PEERCRED`, `SO_PEERGROUPS`) is checked on each request: root, or
//!   a member of the `--api-group`. Anyone else (a socket opened up by
//!   mistake, a process that inherited a connection) gets `forbidden`
//!   (403) and a log line.
//! - The read-only socket (`--api-ro-socket`, optional): 0666, for any
//!   local user who can reach it; only reads (GET, HEAD) of status, never
//!   a guest's console, never a change.

use std::future::IntoFuture;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use axum::Router;
use tandem_api::ErrorKind;
use tandem_supervisor::sock::{
    bind_unix, create_socket_dir, peer_groups, remove_stale_socket, SocketPerms,
};
use tokio::net::UnixListener;
use tracing::warn;

use crate::error::HttpError;

/// Who is at the other end of an API connection, as the kernel recorded
/// it when the connection was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups; empty if the kernel could not say.
    pub groups: Vec<u32>,
}

/// The peer of a connection (`None`: its credentials could not be read,
/// and it is refused on the read-write socket).
#[derive(Debug, Clone)]
pub struct PeerInfo(pub Option<Peer>);

impl Connected<IncomingStream<'_, UnixListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        let io = stream.io();
        let Ok(cred) = io.peer_cred() else {
            return PeerInfo(None);
        };
        PeerInfo(Some(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups: peer_groups(io.as_fd()).unwrap_or_default(),
        }))
    }
}

/// Which socket a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    ReadWrite,
    ReadOnly,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::ReadWrite => "read-write",
            Role::ReadOnly => "read-only",
        }
    }
}

/// The group (besides root) that may use the read-write socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiGroup {
    pub gid: u32,
    /// As given on the command line, for messages.
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub role: Role,
    pub group: Option<ApiGroup>,
}

/// Whether `peer` may make the request `method path` on a socket of
/// `policy`; the refusal says why.
pub fn authorize(
    policy: &Policy,
    peer: Option<&Peer>,
    method: &Method,
    path: &str,
) -> Result<(), String> {
    match policy.role {
        Role::ReadOnly => {
            let read = *method == Method::GET || *method == Method::HEAD;
            // A guest's console is its own output (passwords typed at a
            // prompt, keys printed by the guest): not for every local user.
            if read && !path.ends_with("/console") {
                Ok(())
            } else {
                Err(format!(
                    "this is tandemd's read-only socket: {method} {path} is not a read of status; \
                     use the read-write socket"
                ))
            }
        }
        Role::ReadWrite => {
            let Some(peer) = peer else {
                return Err("the peer's credentials could not be read".into());
            };
            let in_group = policy
                .group
                .as_ref()
                .is_some_and(|g| peer.gid == g.gid || peer.groups.contains(&g.gid));
            if peer.uid == 0 || in_group {
                return Ok(());
            }
            Err(match &policy.group {
                Some(g) => format!(
                    "uid {} may not use tandemd's API: only root and members of group `{}` (gid {}) may",
                    peer.uid, g.name, g.gid
                ),
                None => format!(
                    "uid {} may not use tandemd's API: only root may (tandemd --api-group names a group that may too)",
                    peer.uid
                ),
            })
        }
    }
}

/// The middleware that applies a socket's [`Policy`] to every request,
/// unknown routes included.
async fn guard(
    State(policy): State<Arc<Policy>>,
    ConnectInfo(PeerInfo(peer)): ConnectInfo<PeerInfo>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    match authorize(&policy, peer.as_ref(), req.method(), &path) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            warn!(
                socket = policy.role.as_str(),
                uid = peer.as_ref().map(|p| p.uid),
                gid = peer.as_ref().map(|p| p.gid),
                pid = peer.as_ref().and_then(|p| p.pid),
                method = %req.method(),
                %path,
                "refused an API request: {why}"
            );
            HttpError::new(ErrorKind::Forbidden, why).into_response()
        }
    }
}

/// The bound API sockets.
pub struct ApiSockets {
    rw: (UnixListener, PathBuf),
    ro: Option<(UnixListener, PathBuf)>,
    group: Option<ApiGroup>,
}

/// Binds the read-write socket at `rw` (and the read-only one at `ro`),
/// refusing to take a socket a live tandemd still serves.
pub async fn bind(
    rw: &Path,
    group: Option<ApiGroup>,
    ro: Option<&Path>,
) -> anyhow::Result<ApiSockets> {
    let gid = group.as_ref().map(|g| g.gid);
    let (dir_mode, sock_mode) = match gid {
        Some(_) => (0o750, 0o660),
        None => (0o700, 0o600),
    };
    let rw_l = bind_one(
        rw,
        dir_mode,
        SocketPerms {
            mode: sock_mode,
            group: gid,
        },
    )
    .await?;
    let ro_l = match ro {
        Some(p) => {
            let perms = SocketPerms {
                mode: 0o666,
                group: None,
            };
            Some((bind_one(p, 0o755, perms).await?, p.to_path_buf()))
        }
        None => None,
    };
    Ok(ApiSockets {
        rw: (rw_l, rw.to_path_buf()),
        ro: ro_l,
        group,
    })
}

async fn bind_one(path: &Path, dir_mode: u32, perms: SocketPerms) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        create_socket_dir(dir, dir_mode, perms.group)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::fs::symlink_metadata(path).is_ok()
        && tokio::net::UnixStream::connect(path).await.is_ok()
    {
        bail!("another tandemd is already serving {}", path.display());
    }
    let l = bind_unix(path, perms).with_context(|| format!("binding {}", path.display()))?;
    l.set_nonblocking(true)?;
    Ok(UnixListener::from_std(l)?)
}

/// Serves `app` on the sockets until `shutdown` completes, then removes
/// them.
pub async fn serve(
    sockets: ApiSockets,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ApiSockets { rw, ro, group } = sockets;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let guarded = |role: Role| {
        let policy = Arc::new(Policy {
            role,
            group: group.clone(),
        });
        app.clone()
            .layer(axum::middleware::from_fn_with_state(policy, guard))
            .into_make_service_with_connect_info::<PeerInfo>()
    };
    let rw_server = axum::serve(rw.0, guarded(Role::ReadWrite))
        .with_graceful_shutdown(stopped(stop_rx.clone()))
        .into_future();
    let (ro_l, ro_path) = match ro {
        Some((l, p)) => (Some(l), Some(p)),
        None => (None, None),
    };
    let result = match ro_l {
        Some(l) => {
            let ro_server = axum::serve(l, guarded(Role::ReadOnly))
                .with_graceful_shutdown(stopped(stop_rx.clone()))
                .into_future();
            let (a, b) = tokio::join!(rw_server, ro_server);
            a.and(b)
        }
        None => rw_server.await,
    };
    let _ = remove_stale_socket(&rw.1);
    if let Some(p) = &ro_path {
        let _ = remove_stale_socket(p);
    }
    result.context("serving the API")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: Some(1234),
            groups: groups.to_vec(),
        }
    }

    fn rw(group: Option<u32>) -> Policy {
        Policy {
            role: Role::ReadWrite,
            group: group.map(|gid| ApiGroup {
                gid,
                name: "tandem".into(),
            }),
        }
    }

    #[test]
    fn the_read_write_socket_is_root_and_the_api_group() {
        let post = Method::POST;
        let ok = |p: &Policy, who: &Peer| authorize(p, Some(who), &post, "/v1/vms").is_ok();
        assert!(ok(&rw(None), &peer(0, 0, &[])));
        assert!(!ok(&rw(None), &peer(1000, 1000, &[])));
        // Group 0 alone is not root.
        assert!(!ok(&rw(None), &peer(1000, 0, &[0])));
        assert!(ok(&rw(Some(150)), &peer(1000, 150, &[])));
        assert!(ok(&rw(Some(150)), &peer(1000, 1000, &[27, 150])));
        assert!(!ok(&rw(Some(150)), &peer(1000, 1000, &[27])));
        let e = authorize(
            &rw(Some(150)),
            Some(&peer(1000, 1000, &[])),
            &post,
            "/v1/vms",
        )
        .unwrap_err();
        assert!(
            e.contains("uid 1000") && e.contains("group `tandem`"),
            "{e}"
        );
        // Reads too: the read-write socket is all or nothing.
        let e = authorize(&rw(None), Some(&peer(7, 7, &[])), &Method::GET, "/v1/vms");
        assert!(e.unwrap_err().contains("only root"));
        assert!(authorize(&rw(None), None, &Method::GET, "/v1/host").is_err());
    }

    #[test]
    fn the_read_only_socket_only_reads_status() {
        let ro = Policy {
            role: Role::ReadOnly,
            group: None,
        };
        let anyone = peer(1000, 1000, &[]);
        for (method, path) in [
            (Method::GET, "/v1/vms"),
            (Method::GET, "/v1/vms/web"),
            (Method::HEAD, "/v1/host"),
            (Method::GET, "/v1/ft"),
            (Method::GET, "/metrics"),
        ] {
            assert!(
                authorize(&ro, Some(&anyone), &method, path).is_ok(),
                "{method} {path}"
            );
        }
        for (method, path) in [
            (Method::POST, "/v1/vms"),
            (Method::POST, "/v1/vms/web/stop"),
            (Method::DELETE, "/v1/vms/web"),
            (Method::PUT, "/v1/switch"),
            (Method::GET, "/v1/vms/web/console"),
        ] {
            let e = authorize(&ro, Some(&anyone), &method, path).unwrap_err();
            assert!(e.contains("read-only socket"), "{method} {path}: {e}");
            // Root too: the socket, not the caller, is read-only.
            assert!(authorize(&ro, Some(&peer(0, 0, &[])), &method, path).is_err());
        }
    }
}
