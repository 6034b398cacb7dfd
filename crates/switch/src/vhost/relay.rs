//! The shim between QEMU and the daemon.
//!
//! QEMU's virtio-net sends VHOST_USER_SET_VRING_ENABLE when the device is
//! reset or the guest acks its features, which is before the first
//! VHOST_USER_SET_FEATURES (vhost_dev_start). The `vhost` crate (0.18)
//! refuses SET_VRING_ENABLE until SET_FEATURES has acked
//! VHOST_USER_F_PROTOCOL_FEATURES, and treats the refusal as fatal for the
//! connection. The shim forwards every message unchanged (file descriptors
//! included) and, before the first early SET_VRING_ENABLE, hands the daemon
//! a SET_FEATURES carrying only that bit (no reply is asked for), so the
//! enable is accepted and remembered; QEMU's own SET_FEATURES follows later
//! and sets the real features.

use std::fs::File;
use std::io;
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::backend::Conn;

const VHOST_USER_SET_FEATURES: u32 = 2;
const VHOST_USER_SET_VRING_ENABLE: u32 = 18;
const VHOST_USER_SET_VRING_KICK: u32 = 12;

/// The daemon handles a ring's enable asynchronously and nothing else
/// wakes its worker afterwards, so after a (re)start it would not look at
/// buffers made available before: poke its egress event until the rings
/// run (bounded: 100 pokes, 2 ms apart, on a short-lived thread).
fn wake_on_start(conn: &Arc<Conn>) {
    if conn.running.load(Ordering::Acquire) {
        return;
    }
    let conn = conn.clone();
    let _ = std::thread::Builder::new()
        .name("vhost-wake".into())
        .spawn(move || {
            for _ in 0..100 {
                let _ = conn.io.egress.notifier().write(1);
                std::thread::sleep(Duration::from_millis(2));
                if conn.running.load(Ordering::Acquire) {
                    let _ = conn.io.egress.notifier().write(1);
                    break;
                }
            }
        });
}
const VHOST_USER_HDR_LEN: usize = 12;
/// Generous bound on a message body (the `vhost` crate allows 4 KiB).
const SHIM_MAX_BODY: usize = 64 * 1024;
/// More descriptors than any message carries (SET_MEM_TABLE: 8).
const SHIM_MAX_FDS: usize = 32;

pub(super) fn start_shims(
    name: &str,
    frontend: &UnixStream,
    backend: &UnixStream,
    conn: Arc<Conn>,
) -> io::Result<[JoinHandle<()>; 2]> {
    let to_backend = {
        let (from, to) = (frontend.try_clone()?, backend.try_clone()?);
        std::thread::Builder::new()
            .name(format!("vhost-shim-{name}"))
            .spawn(move || shim(from, to, true, Some(conn)))?
    };
    let to_frontend = {
        let (from, to) = (backend.try_clone()?, frontend.try_clone()?);
        match std::thread::Builder::new()
            .name(format!("vhost-shim-{name}"))
            .spawn(move || shim(from, to, false, None))
        {
            Ok(t) => t,
            Err(e) => {
                let _ = frontend.shutdown(Shutdown::Both);
                let _ = to_backend.join();
                return Err(e);
            }
        }
    };
    Ok([to_backend, to_frontend])
}

/// Forwards vhost-user messages (with their file descriptors) from `from`
/// to `to` until either side closes, then closes both. `requests`: this is
/// the frontend → daemon direction, where an early `SET_VRING_ENABLE` gets
/// a `SET_FEATURES(PROTOCOL_FEATURES)` slipped in front of it. With `conn`,
/// the worker is woken after a ring is enabled or given a kick descriptor
/// until it sees the rings running (see [`wake_on_start`]).
fn shim(from: UnixStream, to: UnixStream, requests: bool, conn: Option<Arc<Conn>>) {
    let mut features_acked = false;
    let mut msg = Vec::with_capacity(VHOST_USER_HDR_LEN + 256);
    let mut fds = Vec::new();
    loop {
        msg.clear();
        msg.resize(VHOST_USER_HDR_LEN, 0);
        fds.clear();
        match recv_exact(&from, &mut msg, &mut fds) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                debug!(error = %e, "vhost-user shim: receive failed");
                break;
            }
        }
        let word = |i: usize| u32::from_le_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
        let (request, size) = (word(0), word(8) as usize);
        if size > SHIM_MAX_BODY {
            warn!(
                request,
                size, "vhost-user message too large; closing the connection"
            );
            break;
        }
        msg.resize(VHOST_USER_HDR_LEN + size, 0);
        if size > 0
            && !matches!(
                recv_exact(&from, &mut msg[VHOST_USER_HDR_LEN..], &mut fds),
                Ok(true)
            )
        {
            break;
        }
        if requests {
            if request == VHOST_USER_SET_FEATURES {
                features_acked = true;
            } else if request == VHOST_USER_SET_VRING_ENABLE && !features_acked {
                features_acked = true;
                let mut pre = Vec::with_capacity(VHOST_USER_HDR_LEN + 8);
                pre.extend_from_slice(&VHOST_USER_SET_FEATURES.to_le_bytes());
                pre.extend_from_slice(&1u32.to_le_bytes()); // version 1, no reply wanted
                pre.extend_from_slice(&8u32.to_le_bytes());
                pre.extend_from_slice(
                    &VhostUserVirtioFeatures::PROTOCOL_FEATURES
                        .bits()
                        .to_le_bytes(),
                );
                if send_all(&to, &pre, &[]).is_err() {
                    break;
                }
            }
        }
        if let Err(e) = send_all(&to, &msg, &fds) {
            debug!(error = %e, "vhost-user shim: send failed");
            break;
        }
        if let Some(conn) = &conn {
            if request == VHOST_USER_SET_VRING_ENABLE || request == VHOST_USER_SET_VRING_KICK {
                wake_on_start(conn);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Fills `buf` from the socket, keeping the descriptors that arrive with
/// it. `Ok(false)`: the peer closed before the first byte.
///
/// vmm-sys-util's `recv_with_fds`, not nix's `recvmsg`: when the control
/// data is truncated it closes the descriptors that did arrive, where nix
/// refuses to hand them out at all (they would leak).
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<File>) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // libc: the raw iovec is the type `recv_with_fds` takes.
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut raw: [RawFd; SHIM_MAX_FDS] = [-1; SHIM_MAX_FDS];
        // SAFETY: the only iovec describes `rest`, a live buffer borrowed
        // mutably for the whole call and exactly `iov_len` bytes long.
        let got = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
        let (n, nfds) = match got {
            Ok(r) => r,
            Err(e) if e.errno() == Errno::EINTR as i32 => continue,
            Err(e) => return Err(e.into()),
        };
        for &fd in raw.iter().take(nfds) {
            // SAFETY: recvmsg just installed `fd` in this process for us;
            // nothing else owns it, so the File becomes its only owner.
            fds.push(unsafe { File::from_raw_fd(fd) });
        }
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(true)
}

/// Sends `data` with `fds` attached to its first byte.
fn send_all(sock: &UnixStream, data: &[u8], fds: &[File]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    let mut attach: &[RawFd] = &raw;
    while sent < data.len() {
        match sock.send_with_fds(&[&data[sent..]], attach) {
            Ok(n) => {
                sent += n;
                attach = &[];
            }
            Err(e) if e.errno() == Errno::EINTR as i32 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vu_msg(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    fn read_msg(sock: &UnixStream) -> (Vec<u8>, usize) {
        let mut hdr = vec![0u8; VHOST_USER_HDR_LEN];
        let mut fds = Vec::new();
        assert!(recv_exact(sock, &mut hdr, &mut fds).unwrap());
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        let mut body = vec![0u8; size];
        if size > 0 {
            assert!(recv_exact(sock, &mut body, &mut fds).unwrap());
        }
        hdr.extend(body);
        (hdr, fds.len())
    }

    #[test]
    fn shim_acks_protocol_features_before_an_early_vring_enable() {
        let (qemu, shim_in) = UnixStream::pair().unwrap();
        let (shim_out, daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || shim(shim_in, shim_out, true, None));
        let kick = vu_msg(12, 1, &0u64.to_le_bytes());
        let enable = vu_msg(VHOST_USER_SET_VRING_ENABLE, 9, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let features = vu_msg(
            VHOST_USER_SET_FEATURES,
            1,
            &(1u64 << 32 | 1 << 30).to_le_bytes(),
        );
        send_all(&qemu, &kick, &[File::open("/dev/null").unwrap()]).unwrap();
        send_all(&qemu, &enable, &[]).unwrap();
        send_all(&qemu, &enable, &[]).unwrap();
        send_all(&qemu, &features, &[]).unwrap();
        send_all(&qemu, &enable, &[]).unwrap();
        assert_eq!(read_msg(&daemon), (kick, 1), "descriptor forwarded");
        let pre = vu_msg(
            VHOST_USER_SET_FEATURES,
            1,
            &VhostUserVirtioFeatures::PROTOCOL_FEATURES
                .bits()
                .to_le_bytes(),
        );
        assert_eq!(read_msg(&daemon), (pre, 0));
        assert_eq!(read_msg(&daemon), (enable.clone(), 0));
        assert_eq!(
            read_msg(&daemon),
            (enable.clone(), 0),
            "only one synthetic message"
        );
        assert_eq!(read_msg(&daemon), (features, 0));
        assert_eq!(read_msg(&daemon), (enable, 0));
        drop(qemu);
        t.join().unwrap();
        let mut fds = Vec::new();
        assert!(
            !recv_exact(&daemon, &mut [0u8; 4], &mut fds).unwrap(),
            "EOF passed on"
        );
    }

    #[test]
    fn shim_refuses_oversized_messages() {
        let (qemu, shim_in) = UnixStream::pair().unwrap();
        let (shim_out, daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || shim(shim_in, shim_out, true, None));
        let mut hdr = vu_msg(5, 1, &[]);
        hdr[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        send_all(&qemu, &hdr, &[]).unwrap();
        t.join().unwrap();
        let mut fds = Vec::new();
        assert!(!recv_exact(&daemon, &mut [0u8; 4], &mut fds).unwrap());
    }
}
