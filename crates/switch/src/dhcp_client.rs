//! What a destination host does about DHCP when a VM arrives without a
//! binding handed over: asks the server what the VM's MAC holds (an RFC
//! 4388 lease query, sent as a relay agent), or renews the lease on the
//! VM's behalf (an RFC 2131 RENEWING request) so that the server's ACK
//! crosses the switch and its snooping installs the binding.
//!
//! Blocking std sockets: this runs on the switch's own threads, rarely
//! (once per arriving VM), and waits at most `tries × timeout`.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
};

use crate::dhcp::{
    encode_lease_query, encode_renew_request, parse_bootp, DhcpMessage, MessageType, BOOTREPLY,
    CLIENT_PORT, INFINITE_LEASE, SERVER_PORT,
};
use crate::frame::Mac;

/// What the server said about a MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseQueryAnswer {
    /// DHCPLEASEACTIVE. `lease_remaining_s` is `None` for an infinite
    /// lease; a server that leaves the time out (RFC 4388 requires it)
    /// gets `Some(0)`, so the caller renews rather than trusting the lease
    /// forever. `server` is option 54, or the address that answered.
    Active {
        ip: Ipv4Addr,
        lease_remaining_s: Option<u64>,
        server: Ipv4Addr,
    },
    /// DHCPLEASEUNASSIGNED: the server knows the address space but this
    /// client holds nothing.
    Unassigned,
    /// DHCPLEASEUNKNOWN: the server has never heard of the client.
    Unknown,
    /// No answer after every try: the server is down, unreachable, or
    /// does not implement lease query (dnsmasq stays silent).
    NoAnswer,
}

/// Every lease query binds the same (giaddr, 67): with SO_REUSEADDR two
/// concurrent queries would both bind, and the kernel would hand each
/// reply to one socket only. One at a time per process avoids that.
static LEASE_QUERY_SOCKET: Mutex<()> = Mutex::new(());

/// A transaction id need only tell this exchange's replies apart from
/// others' on the same path; it guards nothing (anyone on the path sees
/// it), so a hash of time, pid and std's per-process random keys will do.
fn fresh_xid() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(since_epoch.as_nanos());
    h.write_u32(std::process::id());
    let mixed = h.finish();
    (mixed ^ (mixed >> 32)) as u32
}

/// A UDP socket on `addr` with SO_REUSEADDR, since a DHCP server or relay
/// on the host may hold the same port on another socket.
fn reusable_udp(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    Ok(UdpSocket::from(fd))
}

fn answer_of(reply: &DhcpMessage, server: Ipv4Addr) -> Option<LeaseQueryAnswer> {
    match reply.message_type? {
        MessageType::LeaseActive if !reply.ciaddr.is_unspecified() => {
            Some(LeaseQueryAnswer::Active {
                ip: reply.ciaddr,
                lease_remaining_s: match reply.lease_time {
                    Some(INFINITE_LEASE) => None,
                    Some(secs) => Some(u64::from(secs)),
                    None => Some(0),
                },
                server: reply.server_id.unwrap_or(server),
            })
        }
        MessageType::LeaseUnassigned => Some(LeaseQueryAnswer::Unassigned),
        MessageType::LeaseUnknown => Some(LeaseQueryAnswer::Unknown),
        _ => None,
    }
}

/// Asks `server` what `mac` holds: an RFC 4388 DHCPLEASEQUERY sent as a
/// relay agent at `giaddr` (servers answer lease queries only to relays,
/// at giaddr port 67), tried `tries` times (at least once), waiting
/// `timeout` for each. Only replies from `server` with this query's xid
/// count.
pub fn lease_query(
    giaddr: Ipv4Addr,
    server: Ipv4Addr,
    mac: Mac,
    client_id: Option<&[u8]>,
    tries: u32,
    timeout: Duration,
) -> io::Result<LeaseQueryAnswer> {
    lease_query_with_reply(giaddr, server, mac, client_id, tries, timeout).map(|(a, _)| a)
}

/// [`lease_query`], also returning the server's reply as parsed (`None`
/// with [`LeaseQueryAnswer::NoAnswer`]), for a caller that feeds it to the
/// binding table or logs it.
pub fn lease_query_with_reply(
    giaddr: Ipv4Addr,
    server: Ipv4Addr,
    mac: Mac,
    client_id: Option<&[u8]>,
    tries: u32,
    timeout: Duration,
) -> io::Result<(LeaseQueryAnswer, Option<DhcpMessage>)> {
    let _one_at_a_time = LEASE_QUERY_SOCKET
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let xid = fresh_xid();
    let query = encode_lease_query(xid, mac, giaddr, client_id);
    let sock = reusable_udp(SocketAddrV4::new(giaddr, SERVER_PORT))?;
    let to = SocketAddrV4::new(server, SERVER_PORT);
    let mut buf = vec![0u8; 65536];
    for attempt in 0..tries.max(1) {
        sock.send_to(&query, to)?;
        tracing::debug!(%mac, %server, xid, attempt, "DHCP lease query sent");
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left))?;
            let (len, from) = match sock.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            if from.ip() != std::net::IpAddr::V4(server) {
                continue;
            }
            let Ok(reply) = parse_bootp(&buf[..len]) else {
                continue;
            };
            if reply.xid != xid || reply.op != BOOTREPLY {
                continue;
            }
            if let Some(answer) = answer_of(&reply, server) {
                return Ok((answer, Some(reply)));
            }
        }
    }
    Ok((LeaseQueryAnswer::NoAnswer, None))
}

/// Renews `mac`'s lease of `ip` on the VM's behalf: an RFC 2131 RENEWING
/// DHCPREQUEST from (`from`, 68) to (`server`, 67). The server answers to
/// `ip` itself, so the ACK crosses the switch toward the VM and snooping
/// installs the binding; nothing here waits for it. Returns the xid, to
/// recognise that ACK.
pub fn assisted_renew(
    from: Ipv4Addr,
    server: Ipv4Addr,
    mac: Mac,
    ip: Ipv4Addr,
    client_id: Option<&[u8]>,
) -> io::Result<u32> {
    let xid = fresh_xid();
    let sock = reusable_udp(SocketAddrV4::new(from, CLIENT_PORT))?;
    let request = encode_renew_request(xid, mac, ip, client_id);
    sock.send_to(
        &request,
        SocketAddr::V4(SocketAddrV4::new(server, SERVER_PORT)),
    )?;
    tracing::debug!(%mac, %ip, %server, xid, "assisted DHCP renewal sent");
    Ok(xid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::server_reply;

    #[test]
    fn xids_differ_between_calls() {
        let xids: std::collections::HashSet<u32> = (0..64).map(|_| fresh_xid()).collect();
        assert!(xids.len() > 60);
    }

    #[test]
    fn answers_follow_the_reply_type() {
        let server = Ipv4Addr::new(10, 0, 0, 1);
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        let ip = Ipv4Addr::new(10, 0, 0, 7);
        let active = |lease| server_reply(1, mac, MessageType::LeaseActive, ip, lease, server);
        assert_eq!(
            answer_of(&active(Some(30)), Ipv4Addr::LOCALHOST),
            Some(LeaseQueryAnswer::Active {
                ip,
                lease_remaining_s: Some(30),
                server
            })
        );
        assert!(matches!(
            answer_of(&active(Some(INFINITE_LEASE)), server),
            Some(LeaseQueryAnswer::Active {
                lease_remaining_s: None,
                ..
            })
        ));
        assert!(matches!(
            answer_of(&active(None), server),
            Some(LeaseQueryAnswer::Active {
                lease_remaining_s: Some(0),
                ..
            })
        ));
        let no_ip = server_reply(
            1,
            mac,
            MessageType::LeaseActive,
            Ipv4Addr::UNSPECIFIED,
            Some(1),
            server,
        );
        assert_eq!(answer_of(&no_ip, server), None);
        let unknown = server_reply(
            1,
            mac,
            MessageType::LeaseUnknown,
            Ipv4Addr::UNSPECIFIED,
            None,
            server,
        );
        assert_eq!(answer_of(&unknown, server), Some(LeaseQueryAnswer::Unknown));
        let unassigned = server_reply(
            1,
            mac,
            MessageType::LeaseUnassigned,
            Ipv4Addr::UNSPECIFIED,
            None,
            server,
        );
        assert_eq!(
            answer_of(&unassigned, server),
            Some(LeaseQueryAnswer::Unassigned)
        );
        let ack = server_reply(1, mac, MessageType::Ack, ip, Some(5), server);
        assert_eq!(answer_of(&ack, server), None);
    }

    #[test]
    fn silence_is_no_answer() {
        // Nothing listens on loopback port 67 in the test environment's
        // usual case; if something does, it will not answer this xid.
        let got = lease_query(
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::LOCALHOST,
            Mac([2, 0, 0, 0, 0, 9]),
            None,
            2,
            Duration::from_millis(50),
        );
        match got {
            Ok(answer) => assert_eq!(answer, LeaseQueryAnswer::NoAnswer),
            // Unprivileged runs cannot bind port 67.
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied),
        }
    }
}
