//! Low-level Linux networking helpers shared by the uplink and host ports:
//! interface look-ups and flags through `ioctl`, `poll`, network
//! namespaces, and the stop/join plumbing of a port's I/O thread.
//!
//! Interface ioctls go through a *control socket* rather than
//! `if_nametoindex(3)`: an ioctl acts in the network namespace the socket
//! was created in, so a port created inside a namespace keeps looking at
//! that namespace whatever thread later asks.

use std::ffi::{c_char, c_int, c_short};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::net::if_::InterfaceFlags;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::Cidr;
use crate::offload::Offload;
use crate::port::{DropReason, EgressQueue, PortCounters, MAX_FRAME, MIN_FRAME};

/// `IFNAMSIZ` minus the terminating NUL.
// libc: nix exports no `IFNAMSIZ`.
pub const MAX_IFNAME: usize = libc::IFNAMSIZ - 1;

/// Whether a frame of `len` bytes may enter or leave a port.
pub(crate) fn frame_size_ok(len: usize) -> bool {
    (MIN_FRAME..=MAX_FRAME).contains(&len)
}

/// Checks an interface name the way the kernel's `dev_valid_name` does,
/// and also refuses `%` (the kernel would treat `tap%d` as a pattern and
/// pick a name of its own).
pub fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_IFNAME {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("`.` and `..` are not interface names");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == b'%' || b == 0 || b.is_ascii_whitespace())
    {
        return Err("contains `/`, `:`, `%`, NUL or whitespace");
    }
    Ok(())
}

/// An `AF_INET` datagram socket used only for interface ioctls, in the
/// network namespace of the calling thread.
pub(crate) fn control_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// The interface ioctls, as nix's `ioctl_*_bad!` wrappers around the
/// kernel's own request numbers (libc's constants). Each passes one
/// `struct ifreq`.
mod ioctls {
    nix::ioctl_readwrite_bad!(
        /// `SIOCGIFINDEX`: reads the name, writes `ifru_ifindex`.
        siocgifindex,
        libc::SIOCGIFINDEX,
        libc::ifreq
    );
    nix::ioctl_readwrite_bad!(
        /// `SIOCGIFFLAGS`: reads the name, writes `ifru_flags`.
        siocgifflags,
        libc::SIOCGIFFLAGS,
        libc::ifreq
    );
    nix::ioctl_write_ptr_bad!(
        /// `SIOCSIFFLAGS`: reads the name and `ifru_flags`.
        siocsifflags,
        libc::SIOCSIFFLAGS,
        libc::ifreq
    );
    nix::ioctl_readwrite_bad!(
        /// `TUNSETIFF`: reads the name and `ifru_flags`, writes back the
        /// name the kernel gave the device. (Its request number claims an
        /// `int`; the kernel copies a whole `struct ifreq` both ways.)
        tunsetiff,
        libc::TUNSETIFF,
        libc::ifreq
    );
    nix::ioctl_readwrite_bad!(
        /// `SIOCETHTOOL`: reads the name and `ifru_data`, a pointer to the
        /// ethtool command, which the kernel reads and writes.
        siocethtool,
        libc::SIOCETHTOOL,
        libc::ifreq
    );
    nix::ioctl_readwrite_bad!(
        /// `SIOCGIFMTU`: reads the name, writes `ifru_mtu`.
        siocgifmtu,
        libc::SIOCGIFMTU,
        libc::ifreq
    );
    nix::ioctl_write_ptr_bad!(
        /// `SIOCSIFMTU`: reads the name and `ifru_mtu`.
        siocsifmtu,
        libc::SIOCSIFMTU,
        libc::ifreq
    );
}

/// A zeroed `ifreq` carrying `name`.
// libc: nix has no `struct ifreq`.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    check_ifname(name).map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))?;
    // SAFETY: `ifreq` is plain old data (a byte array and a union of
    // integers, sockaddrs and a pointer); all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as c_char;
    }
    Ok(req)
}

/// The index of interface `name`, `None` if there is no such interface.
pub(crate) fn ifindex(ctl: &OwnedFd, name: &str) -> io::Result<Option<c_int>> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFINDEX reads and writes one `struct ifreq`, and `req`
    // is a valid, exclusively borrowed one.
    match unsafe { ioctls::siocgifindex(ctl.as_raw_fd(), &mut req) } {
        // SAFETY: SIOCGIFINDEX succeeded, so the kernel filled `ifru_ifindex`.
        Ok(_) => Ok(Some(unsafe { req.ifr_ifru.ifru_ifindex })),
        Err(Errno::ENODEV | Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The `IFF_*` flags of interface `name` (`SIOCGIFFLAGS`, so the low 16
/// bits only), `None` if there is no such interface.
pub(crate) fn ifflags(ctl: &OwnedFd, name: &str) -> io::Result<Option<c_int>> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads and writes one `struct ifreq`, and `req`
    // is a valid, exclusively borrowed one.
    match unsafe { ioctls::siocgifflags(ctl.as_raw_fd(), &mut req) } {
        // SAFETY: SIOCGIFFLAGS succeeded, so the kernel filled `ifru_flags`.
        Ok(_) => Ok(Some(
            c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff,
        )),
        Err(Errno::ENODEV | Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether `name` is administratively up and its operational state is up:
/// `IFF_UP` and `IFF_RUNNING`. The operational state follows the carrier
/// through the kernel's link-watch work, which may defer a change by up
/// to a second; [`LinkQuery`] sees the carrier itself.
pub(crate) fn is_running(ctl: &OwnedFd, name: &str) -> bool {
    let want = (InterfaceFlags::IFF_UP | InterfaceFlags::IFF_RUNNING).bits();
    matches!(ifflags(ctl, name), Ok(Some(f)) if f & want == want)
}

/// Reads interface flags over rtnetlink (`RTM_GETLINK`), which, unlike
/// `SIOCGIFFLAGS`, include `IFF_LOWER_UP` (the carrier as the driver
/// reports it, without the link-watch delay) and `IFF_DORMANT`. Works in
/// the namespace the query was created in.
pub(crate) struct LinkQuery {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

impl LinkQuery {
    pub(crate) fn new() -> io::Result<LinkQuery> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        // Replies come at once; the time-out only guards against a kernel
        // that never answers.
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(1, 0))?;
        Ok(LinkQuery {
            fd,
            seq: 0,
            buf: vec![0; 32 * 1024],
        })
    }

    /// The full `IFF_*` flags of interface `index`; `None` if there is no
    /// such interface.
    pub(crate) fn flags(&mut self, index: c_int) -> io::Result<Option<u32>> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
        // libc: nix has no rtnetlink message constants.
        req[0..4].copy_from_slice(&((NLMSG_HDRLEN + IFINFOMSG_LEN) as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
        req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        req[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        // ifinfomsg: family AF_UNSPEC, then the index at offset 4.
        req[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].copy_from_slice(&index.to_ne_bytes());
        // Pid 0, no groups: the kernel.
        let kernel = NetlinkAddr::new(0, 0);
        socket::sendto(self.fd.as_raw_fd(), &req, &kernel, MsgFlags::empty())?;
        // Replies to earlier queries that timed out may come first.
        for _ in 0..8 {
            let n = socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
            if let Some(answer) = parse_link_reply(&self.buf[..n.min(self.buf.len())], self.seq) {
                return answer;
            }
        }
        Err(io::Error::other("no rtnetlink reply to RTM_GETLINK"))
    }
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Looks through one datagram of rtnetlink messages for the answer to
/// query `seq`: the link's flags, `None` for "no such device", or an
/// error. `None` (outer) if the datagram holds no answer to `seq`.
fn parse_link_reply(mut b: &[u8], seq: u32) -> Option<io::Result<Option<u32>>> {
    const ENODEV: i32 = Errno::ENODEV as i32;
    while b.len() >= NLMSG_HDRLEN {
        let len = ne_u32(b, 0)? as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if ne_u32(b, 8)? == seq {
            // libc: nix has no rtnetlink message constants.
            if kind == libc::NLMSG_ERROR as u16 {
                let errno = ne_u32(b, NLMSG_HDRLEN)? as i32;
                return Some(match -errno {
                    0 => Err(io::Error::other("rtnetlink acknowledged without data")),
                    ENODEV => Ok(None),
                    e => Err(io::Error::from_raw_os_error(e)),
                });
            }
            if kind == libc::RTM_NEWLINK && len >= NLMSG_HDRLEN + IFINFOMSG_LEN {
                return Some(Ok(Some(ne_u32(b, NLMSG_HDRLEN + 8)?)));
            }
        }
        b = b.get((len + 3) & !3..)?;
    }
    None
}

/// Whether interface `index` is up with carrier: `IFF_UP` and
/// `IFF_LOWER_UP`, and not `IFF_DORMANT` (waiting for, say, 802.1X).
pub(crate) fn link_is_up(flags: u32) -> bool {
    let f = InterfaceFlags::from_bits_retain(flags as c_int);
    f.contains(InterfaceFlags::IFF_UP)
        && f.contains(InterfaceFlags::IFF_LOWER_UP)
        && !f.contains(InterfaceFlags::IFF_DORMANT)
}

/// Sets `IFF_UP` on interface `name`.
pub(crate) fn set_up(ctl: &OwnedFd, name: &str) -> io::Result<()> {
    let flags = ifflags(ctl, name)?.ok_or_else(|| io::Error::from(Errno::ENODEV))?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags = (flags | InterfaceFlags::IFF_UP.bits()) as c_short;
    // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`, and `req` is a valid
    // one.
    unsafe { ioctls::siocsifflags(ctl.as_raw_fd(), &req) }?;
    Ok(())
}

/// The MTU of interface `name`, `None` if there is no such interface.
pub(crate) fn mtu(ctl: &OwnedFd, name: &str) -> io::Result<Option<u32>> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFMTU reads and writes one `struct ifreq`, and `req` is
    // a valid, exclusively borrowed one.
    match unsafe { ioctls::siocgifmtu(ctl.as_raw_fd(), &mut req) } {
        // SAFETY: SIOCGIFMTU succeeded, so the kernel filled `ifru_mtu`.
        Ok(_) => Ok(u32::try_from(unsafe { req.ifr_ifru.ifru_mtu }).ok()),
        Err(Errno::ENODEV | Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Sets the MTU of interface `name` (the kernel refuses values outside
/// the device's own range with `EINVAL`).
pub(crate) fn set_mtu(ctl: &OwnedFd, name: &str, mtu: u32) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = c_int::try_from(mtu).map_err(|_| io::Error::from(Errno::EINVAL))?;
    // SAFETY: SIOCSIFMTU reads one `struct ifreq`, and `req` is a valid
    // one.
    unsafe { ioctls::siocsifmtu(ctl.as_raw_fd(), &req) }?;
    Ok(())
}

/// rtnetlink requests the kernel acknowledges: adding and removing
/// interface addresses. Acts in the namespace the socket was created in,
/// so a port keeps configuring its own interface whatever thread asks.
pub(crate) struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

const IFADDRMSG_LEN: usize = 8;

impl Rtnl {
    pub(crate) fn new() -> io::Result<Rtnl> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        // Acknowledgements come at once; the time-out only guards against
        // a kernel that never answers.
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(1, 0))?;
        Ok(Rtnl {
            fd,
            seq: 0,
            buf: vec![0; 8 * 1024],
        })
    }

    /// Adds `addr` to interface `index`; an address already there is
    /// success (an apply makes the interface match, whoever added it).
    pub(crate) fn add_address(&mut self, index: c_int, addr: &Cidr) -> io::Result<()> {
        // libc: nix has no rtnetlink message constants.
        let flags = libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        match self.request(libc::RTM_NEWADDR, flags, &addr_message(index, addr)) {
            Err(e) if e.raw_os_error() == Some(Errno::EEXIST as i32) => Ok(()),
            r => r,
        }
    }

    /// Removes `addr` from interface `index`; an address that is not there
    /// (or an interface whose IPv6 the kernel took away) is success.
    pub(crate) fn del_address(&mut self, index: c_int, addr: &Cidr) -> io::Result<()> {
        match self.request(libc::RTM_DELADDR, 0, &addr_message(index, addr)) {
            Err(e)
                if matches!(
                    e.raw_os_error().map(Errno::from_raw),
                    Some(Errno::EADDRNOTAVAIL | Errno::ENXIO | Errno::ENODEV)
                ) =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, kind: u16, flags: c_int, body: &[u8]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDRLEN + body.len();
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&(len as u32).to_ne_bytes());
        req.extend_from_slice(&kind.to_ne_bytes());
        // libc: nix has no rtnetlink message constants.
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | flags) as u16;
        req.extend_from_slice(&flags.to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(body);
        let kernel = NetlinkAddr::new(0, 0);
        socket::sendto(self.fd.as_raw_fd(), &req, &kernel, MsgFlags::empty())?;
        // Answers to earlier requests that timed out may come first.
        for _ in 0..8 {
            let n = socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
            if let Some(answer) = parse_ack(&self.buf[..n.min(self.buf.len())], self.seq) {
                return answer;
            }
        }
        Err(io::Error::other("no rtnetlink acknowledgement"))
    }
}

/// An `ifaddrmsg` for `addr` on interface `index`, with `IFA_LOCAL` and
/// `IFA_ADDRESS` (and for IPv4 the subnet's broadcast address, as
/// `ip address add … brd +` sets it).
fn addr_message(index: c_int, addr: &Cidr) -> Vec<u8> {
    let (family, bytes, broadcast) = match addr.addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let host_mask = u32::MAX.checked_shr(u32::from(addr.prefix)).unwrap_or(0);
            // /31 and /32 have no broadcast address (RFC 3021).
            let brd = (addr.prefix <= 30).then(|| (bits | host_mask).to_be_bytes().to_vec());
            (libc::AF_INET, a.octets().to_vec(), brd)
        }
        IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec(), None),
    };
    let mut m = Vec::with_capacity(IFADDRMSG_LEN + 3 * 20);
    // ifaddrmsg: family, prefix length, flags, scope (universe; the
    // kernel picks link scope for fe80::/10 itself), index.
    m.extend_from_slice(&[family as u8, addr.prefix, 0, 0]);
    m.extend_from_slice(&index.to_ne_bytes());
    // libc: nix has no rtnetlink attribute constants.
    rtattr(&mut m, libc::IFA_LOCAL, &bytes);
    rtattr(&mut m, libc::IFA_ADDRESS, &bytes);
    if let Some(b) = broadcast {
        rtattr(&mut m, libc::IFA_BROADCAST, &b);
    }
    m
}

/// Appends one `rtattr` (length, type, data, padding to 4 bytes).
fn rtattr(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Looks through one datagram of rtnetlink messages for the
/// acknowledgement of request `seq`. `None` if it holds none.
fn parse_ack(mut b: &[u8], seq: u32) -> Option<io::Result<()>> {
    while b.len() >= NLMSG_HDRLEN {
        let len = ne_u32(b, 0)? as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        // libc: nix has no rtnetlink message constants.
        if ne_u32(b, 8)? == seq && kind == libc::NLMSG_ERROR as u16 {
            let errno = ne_u32(b, NLMSG_HDRLEN)? as i32;
            return Some(match errno {
                0 => Ok(()),
                e => Err(io::Error::from_raw_os_error(e.saturating_neg())),
            });
        }
        b = b.get((len + 3) & !3..)?;
    }
    None
}

/// `TUNSETIFF` on an open `/dev/net/tun` with `flags`; returns the name
/// the kernel gave the device.
pub(crate) fn tun_set_iff(tun: &OwnedFd, name: &str, flags: c_int) -> io::Result<String> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags = flags as c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, and `req` is a
    // valid, exclusively borrowed one.
    unsafe { ioctls::tunsetiff(tun.as_raw_fd(), &mut req) }?;
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Whether generic receive offload is on for `name` (`ETHTOOL_GGRO`);
/// `None` if the driver does not say.
pub(crate) fn gro_enabled(ctl: &OwnedFd, name: &str) -> Option<bool> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_GGRO: u32 = 0x0000_002b;
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GGRO,
        data: 0,
    };
    let mut req = ifreq(name).ok()?;
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GGRO reads one `struct ifreq` and
    // reads and writes one `struct ethtool_value` through `ifru_data`,
    // which points at `value`, alive and exclusively borrowed for the call;
    // `req` is a valid, exclusively borrowed `ifreq`.
    let r = unsafe { ioctls::siocethtool(ctl.as_raw_fd(), &mut req) };
    matches!(r, Ok(0)).then_some(value.data != 0)
}

/// Sets an integer socket option.
// libc: for the `SOL_PACKET` options (`PACKET_AUXDATA`, `PACKET_VNET_HDR`,
// `PACKET_IGNORE_OUTGOING`), for which nix has no `sockopt`.
pub(crate) fn setsockopt_int(
    fd: &OwnedFd,
    level: c_int,
    opt: c_int,
    value: c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live `c_int` and its exact size is
    // passed along.
    Errno::result(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&value as *const c_int).cast(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Takes and clears the pending error of a socket (`SO_ERROR`).
pub(crate) fn take_socket_error(fd: &OwnedFd) -> Option<io::Error> {
    match socket::getsockopt(fd, sockopt::SocketError) {
        Ok(err) if err != 0 => Some(io::Error::from_raw_os_error(err)),
        _ => None,
    }
}

/// `poll(2)`; an interrupted call counts as a time-out (`Ok(0)`).
pub(crate) fn poll(fds: &mut [PollFd<'_>], timeout: Duration) -> io::Result<usize> {
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match nix::poll::poll(fds, timeout) {
        Ok(n) => Ok(n as usize),
        Err(Errno::EINTR) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The events [`poll`] reported for `fd`. Linux reports only the events
/// asked for plus `POLLERR`, `POLLHUP` and `POLLNVAL`, all of which
/// `PollFlags` knows, so the `None` of an unknown bit does not happen.
pub(crate) fn revents(fd: &PollFd<'_>) -> PollFlags {
    fd.revents().unwrap_or(PollFlags::empty())
}

/// An eventfd's descriptor, to poll it (vmm-sys-util's `EventFd` has no
/// `AsFd`).
pub(crate) fn eventfd_fd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: `e` owns its descriptor and keeps it open until it is
    // dropped, and the returned borrow cannot outlive `e`.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// What to do with a frame whose transmission failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxFailure {
    /// The socket's send buffer is full (`EAGAIN`): put the frame back and
    /// retry when the descriptor is writable.
    Blocked,
    /// The device or its queue discipline had no room (`ENOBUFS`): put the
    /// frame back and retry after [`TX_RETRY`], at most
    /// [`TX_CONGESTED_TRIES`] times.
    Congested,
    /// The link is down or gone (`ENETDOWN`, `ENXIO`, `ENODEV`): drop as
    /// `NoBuffer` and look at the link again.
    LinkDown,
    /// The device refused the frame's size (`EMSGSIZE`, `EINVAL`): drop as
    /// `Malformed`.
    BadFrame,
    /// Anything else: drop as `NoBuffer`.
    Other,
}

pub(crate) fn classify_tx_error(e: &io::Error) -> TxFailure {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EAGAIN | Errno::EINTR) => TxFailure::Blocked,
        Some(Errno::ENOBUFS) => TxFailure::Congested,
        Some(Errno::ENETDOWN | Errno::ENXIO | Errno::ENODEV) => TxFailure::LinkDown,
        Some(Errno::EMSGSIZE | Errno::EINVAL) => TxFailure::BadFrame,
        _ => TxFailure::Other,
    }
}

/// How long a port waits before retrying a transmission that hit
/// back-pressure.
pub(crate) const TX_RETRY: Duration = Duration::from_millis(10);
/// How many times a frame is retried after `ENOBUFS` before it is dropped,
/// so that a frame something always refuses cannot block the queue.
pub(crate) const TX_CONGESTED_TRIES: u32 = 5;
/// Frames a port reads from one descriptor, or writes, per wake-up before
/// looking at its other descriptors.
pub(crate) const BATCH: usize = 64;

/// Sends one frame out of a port.
/// Sends one frame, with the offload work the receiving end (a packet
/// socket with `PACKET_VNET_HDR`) is asked to do; only ports whose queue
/// accepts offloads are given any.
pub(crate) type SendFn<'a> = dyn FnMut(&[u8], &Offload) -> io::Result<()> + 'a;

/// Why [`TxState::transmit`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxOutcome {
    /// Queue empty, batch done, or waiting on back-pressure.
    Done,
    /// A send failed because the link is down or gone; the frame was
    /// dropped. The caller should look at its links; the rest of the queue
    /// is tried on the next round.
    LinkDown,
}

/// The transmit side of a port's loop: pops egress frames and sends them,
/// handling back-pressure, drops and their counting.
#[derive(Debug)]
pub(crate) struct TxState {
    /// The egress queue may hold frames: try to send without waiting.
    more: bool,
    /// The head frame was put back: wait for writability (`Blocked`) or
    /// the retry timer (`Congested`).
    waiting: Option<TxFailure>,
    congested_tries: u32,
    last_error: Option<i32>,
}

impl TxState {
    pub(crate) fn new() -> TxState {
        TxState {
            more: true,
            waiting: None,
            congested_tries: 0,
            last_error: None,
        }
    }

    /// The egress notifier fired (and was drained).
    pub(crate) fn notified(&mut self) {
        self.more = true;
    }

    /// Whether [`TxState::transmit`] should run this round.
    pub(crate) fn pending(&self) -> bool {
        self.more || self.waiting.is_some()
    }

    /// Whether to poll the output descriptor for `POLLOUT`.
    pub(crate) fn wants_writable(&self) -> bool {
        self.waiting == Some(TxFailure::Blocked)
    }

    /// The poll time-out, given the port's own idle time-out.
    pub(crate) fn timeout(&self, idle: Duration) -> Duration {
        if self.more {
            Duration::ZERO
        } else if self.waiting.is_some() {
            TX_RETRY.min(idle)
        } else {
            idle
        }
    }

    /// Sends up to [`BATCH`] queued frames with `send`; `send` is `None`
    /// when the port has nowhere to send (no link), and frames are dropped
    /// as `NoBuffer`.
    pub(crate) fn transmit(
        &mut self,
        label: &str,
        egress: &EgressQueue,
        counters: &PortCounters,
        mut send: Option<&mut SendFn<'_>>,
    ) -> TxOutcome {
        self.waiting = None;
        for _ in 0..BATCH {
            let Some(packet) = egress.pop() else {
                self.more = false;
                return TxOutcome::Done;
            };
            // The switch gives a queue only offload work it accepts; a
            // frame's size limit depends on that work.
            let len = packet.frame.len();
            if !egress.accepts().accepts(&packet.offload)
                || !(MIN_FRAME..=packet.offload.max_frame()).contains(&len)
            {
                counters.dropped(DropReason::Malformed);
                continue;
            }
            let Some(send) = send.as_mut() else {
                counters.dropped(DropReason::NoBuffer);
                continue;
            };
            let err = match send(&packet.frame, &packet.offload) {
                Ok(()) => {
                    counters.transmitted(packet.frame.len());
                    self.last_error = None;
                    self.congested_tries = 0;
                    continue;
                }
                Err(e) => e,
            };
            let failure = classify_tx_error(&err);
            match failure {
                TxFailure::Blocked => {
                    egress.unpop(packet);
                    self.waiting = Some(failure);
                    self.more = false;
                    return TxOutcome::Done;
                }
                TxFailure::Congested if self.congested_tries < TX_CONGESTED_TRIES => {
                    self.congested_tries += 1;
                    egress.unpop(packet);
                    self.waiting = Some(failure);
                    self.more = false;
                    return TxOutcome::Done;
                }
                _ => {}
            }
            self.congested_tries = 0;
            if self.last_error != err.raw_os_error() {
                self.last_error = err.raw_os_error();
                tracing::warn!(port = %label, error = %err, "send failed; dropping frames until it works again");
            }
            if failure == TxFailure::BadFrame {
                counters.dropped(DropReason::Malformed);
            } else {
                counters.dropped(DropReason::NoBuffer);
            }
            if failure == TxFailure::LinkDown {
                self.more = true;
                return TxOutcome::LinkDown;
            }
        }
        self.more = !egress.is_empty();
        TxOutcome::Done
    }
}

/// Reads an eventfd until it is empty.
pub(crate) fn drain_eventfd(e: &EventFd) {
    while e.read().is_ok() {}
}

/// Runs `f` on a fresh thread that has first joined the network namespace
/// at `netns` (for a named namespace, `/var/run/netns/NAME`), and returns
/// its result.
///
/// Sockets and taps belong to the namespace they are created in, whatever
/// thread uses them later, and threads spawned by `f` inherit the
/// namespace; so `in_netns(path, || UplinkHandle::spawn(..))` runs a port
/// in another namespace while the handle is used from anywhere.
pub fn in_netns<T, F>(netns: &Path, f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let ns = File::open(netns)?;
    std::thread::scope(|s| {
        let t = s.spawn(move || -> io::Result<T> {
            // setns(2) only changes the namespace of this (scoped,
            // short-lived) thread.
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)?;
            drop(ns);
            Ok(f())
        });
        match t.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A port's I/O thread with its stop signal. Dropping it stops the thread
/// too.
pub(crate) struct Worker {
    stop: Arc<EventFd>,
    done: mpsc::Receiver<()>,
    handle: Option<JoinHandle<()>>,
    label: String,
}

/// Sends on `done` when the thread ends, even by panic.
struct DoneGuard(mpsc::Sender<()>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// How long stopping a port waits for its I/O thread before leaving it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(3);

impl Worker {
    /// A non-blocking eventfd for [`Worker::spawn`]: the loop must poll it
    /// and return once it is readable.
    pub(crate) fn stop_fd() -> io::Result<Arc<EventFd>> {
        Ok(Arc::new(EventFd::new(EFD_NONBLOCK)?))
    }

    pub(crate) fn spawn(
        label: String,
        thread_name: String,
        stop: Arc<EventFd>,
        body: impl FnOnce() + Send + 'static,
    ) -> io::Result<Worker> {
        let (tx, done) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let _guard = DoneGuard(tx);
                body();
            })?;
        Ok(Worker {
            stop,
            done,
            handle: Some(handle),
            label,
        })
    }

    /// Signals the thread and joins it, waiting at most [`STOP_TIMEOUT`]:
    /// a thread stuck longer (in the ingress callback, say) is left to
    /// finish on its own.
    pub(crate) fn stop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            tracing::warn!(port = %self.label, error = %e, "cannot signal the I/O thread to stop");
        }
        match self.done.recv_timeout(STOP_TIMEOUT) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if handle.join().is_err() {
                    tracing::error!(port = %self.label, "I/O thread panicked");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    port = %self.label,
                    "I/O thread did not stop within {:?}; leaving it behind",
                    STOP_TIMEOUT
                );
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("a23456789012345").is_ok());
        assert!(check_ifname("a234567890123456").is_err());
        for bad in ["", ".", "..", "a/b", "a:1", "tap%d", "a b", "a\0"] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frame_sizes() {
        assert!(!frame_size_ok(0));
        assert!(!frame_size_ok(MIN_FRAME - 1));
        assert!(frame_size_ok(MIN_FRAME));
        assert!(frame_size_ok(MAX_FRAME));
        assert!(!frame_size_ok(MAX_FRAME + 1));
    }

    fn errno(e: Errno) -> io::Error {
        e.into()
    }

    #[test]
    fn transmit_counts_and_backs_off() {
        let q = EgressQueue::new(256, 1 << 20).unwrap();
        let c = PortCounters::default();
        let mut tx = TxState::new();
        assert!(tx.pending());
        assert_eq!(tx.timeout(Duration::from_secs(1)), Duration::ZERO);

        // Sent, malformed, refused for size.
        q.push(vec![1; 60]);
        q.push(vec![2; 13]);
        q.push(vec![3; 1600]);
        q.push(vec![4; 60]);
        let mut sent = Vec::new();
        let mut send = |f: &[u8], _: &Offload| {
            if f[0] == 4 {
                return Err(errno(Errno::EMSGSIZE));
            }
            sent.push(f[0]);
            Ok(())
        };
        assert_eq!(tx.transmit("t", &q, &c, Some(&mut send)), TxOutcome::Done);
        assert_eq!(sent, vec![1]);
        let s = c.snapshot();
        assert_eq!((s.tx_frames, s.tx_bytes, s.drops.malformed), (1, 60, 3));
        assert!(!tx.pending());

        // A full send buffer: the frame goes back, wait for POLLOUT.
        q.push(vec![5; 60]);
        tx.notified();
        let mut full = |_: &[u8], _: &Offload| Err(errno(Errno::EAGAIN));
        tx.transmit("t", &q, &c, Some(&mut full));
        assert_eq!(q.len(), 1);
        assert!(tx.wants_writable() && tx.pending());
        assert_eq!(tx.timeout(Duration::from_secs(1)), TX_RETRY);

        // ENOBUFS: retried a bounded number of times, then dropped.
        let mut congested = |_: &[u8], _: &Offload| Err(errno(Errno::ENOBUFS));
        for _ in 0..TX_CONGESTED_TRIES {
            tx.transmit("t", &q, &c, Some(&mut congested));
            assert_eq!(q.len(), 1);
            assert!(!tx.wants_writable() && tx.pending());
        }
        tx.transmit("t", &q, &c, Some(&mut congested));
        assert!(q.is_empty());
        assert_eq!(c.snapshot().drops.no_buffer, 1);

        // Link down: dropped, reported, the rest waits for the next round.
        q.push(vec![6; 60]);
        q.push(vec![7; 60]);
        let mut down = |_: &[u8], _: &Offload| Err(errno(Errno::ENETDOWN));
        assert_eq!(
            tx.transmit("t", &q, &c, Some(&mut down)),
            TxOutcome::LinkDown
        );
        assert_eq!((q.len(), c.snapshot().drops.no_buffer), (1, 2));
        assert!(tx.pending());

        // Nowhere to send: dropped as NoBuffer.
        assert_eq!(tx.transmit("t", &q, &c, None), TxOutcome::Done);
        assert_eq!((q.len(), c.snapshot().drops.no_buffer), (0, 3));

        // More than a batch: the rest is flagged for an immediate round.
        for _ in 0..BATCH + 3 {
            q.push(vec![8; 60]);
        }
        let mut ok = |_: &[u8], _: &Offload| Ok(());
        tx.transmit("t", &q, &c, Some(&mut ok));
        assert_eq!(q.len(), 3);
        assert_eq!(tx.timeout(Duration::from_secs(1)), Duration::ZERO);
        tx.transmit("t", &q, &c, Some(&mut ok));
        assert!(q.is_empty() && !tx.pending());
    }

    #[test]
    fn link_replies() {
        // libc: nix has no rtnetlink message constants.
        let msg = |kind: u16, seq: u32, body: &[u8]| {
            let mut m = Vec::new();
            m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(body);
            while m.len() % 4 != 0 {
                m.push(0);
            }
            m
        };
        let mut link = vec![0u8; 16];
        link[8..12].copy_from_slice(&0x11043u32.to_ne_bytes());
        let mut both = msg(libc::RTM_NEWLINK, 4, &link);
        both.extend(msg(libc::RTM_NEWLINK, 5, &link));
        assert_eq!(parse_link_reply(&both, 5).unwrap().unwrap(), Some(0x11043));
        assert!(parse_link_reply(&both, 6).is_none());
        let enodev = msg(
            libc::NLMSG_ERROR as u16,
            7,
            &(-(Errno::ENODEV as i32)).to_ne_bytes(),
        );
        assert_eq!(parse_link_reply(&enodev, 7).unwrap().unwrap(), None);
        let eperm = msg(
            libc::NLMSG_ERROR as u16,
            7,
            &(-(Errno::EPERM as i32)).to_ne_bytes(),
        );
        assert!(parse_link_reply(&eperm, 7).unwrap().is_err());
        assert!(parse_link_reply(&both[..20], 5).is_none(), "truncated");
        assert!(link_is_up(0x11043));
        assert!(!link_is_up(0x1043), "no carrier");
        assert!(!link_is_up(0x11042), "admin down");
        assert!(!link_is_up(0x31043), "dormant");
    }

    #[test]
    fn address_messages_and_acks() {
        let a: Cidr = "10.1.2.3/24".parse().unwrap();
        let m = addr_message(7, &a);
        assert_eq!(&m[..4], &[libc::AF_INET as u8, 24, 0, 0]);
        assert_eq!(&m[4..8], &7i32.to_ne_bytes());
        // IFA_LOCAL, IFA_ADDRESS, IFA_BROADCAST: 8 bytes each.
        assert_eq!(m.len(), IFADDRMSG_LEN + 3 * 8);
        assert_eq!(&m[m.len() - 4..], &[10, 1, 2, 255]);
        let m = addr_message(7, &"10.1.2.3/31".parse().unwrap());
        assert_eq!(m.len(), IFADDRMSG_LEN + 2 * 8, "no broadcast on a /31");
        let m = addr_message(7, &"fd00::1/64".parse().unwrap());
        assert_eq!(m[0], libc::AF_INET6 as u8);
        assert_eq!(m.len(), IFADDRMSG_LEN + 2 * 20);

        let ack = |seq: u32, errno: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&errno.to_ne_bytes());
            m.extend_from_slice(&[0; 16]);
            m
        };
        assert!(parse_ack(&ack(3, 0), 3).unwrap().is_ok());
        let e = parse_ack(&ack(3, -(Errno::EEXIST as i32)), 3)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(Errno::EEXIST as i32));
        assert!(parse_ack(&ack(2, 0), 3).is_none(), "another request's");
        assert!(parse_ack(&ack(3, 0)[..20], 3).is_none(), "truncated");
        assert!(parse_ack(&ack(3, i32::MIN), 3).unwrap().is_err());
    }

    proptest::proptest! {
        #[test]
        fn ack_parsing_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), seq in 0u32..4) {
            let _ = parse_ack(&b, seq);
        }

        #[test]
        fn link_reply_parsing_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), seq in 0u32..4) {
            let _ = parse_link_reply(&b, seq);
        }
    }

    #[test]
    fn loopback_lookups() {
        let ctl = control_socket().unwrap();
        assert!(ifindex(&ctl, "lo").unwrap().is_some());
        assert_eq!(ifindex(&ctl, "tsw-nonexist0").unwrap(), None);
        assert_eq!(ifflags(&ctl, "tsw-nonexist0").unwrap(), None);
        let lo = ifindex(&ctl, "lo").unwrap().unwrap();
        let mut q = LinkQuery::new().unwrap();
        let flags = q.flags(lo).unwrap().unwrap();
        assert_ne!(flags & InterfaceFlags::IFF_LOOPBACK.bits() as u32, 0);
        assert_eq!(q.flags(i32::MAX).unwrap(), None);
    }
}
