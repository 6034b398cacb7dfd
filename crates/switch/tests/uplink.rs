//! The uplink port against real kernel objects: veth pairs between two
//! network namespaces created for the test (needs root). The uplink runs
//! in namespace A on the `u*` ends; the test plays the physical network in
//! namespace B on the `p*` ends with its own packet sockets.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::net::if_::if_nametoindex;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrLike};
use tandem_switch::netsys::in_netns;
use tandem_switch::port::{EgressQueue, Ingress, PortCounters, PortId};
use tandem_switch::uplink::{UplinkConfig, UplinkError, UplinkHandle};

const PORT: PortId = 7;
/// IEEE "local experimental" ethertype: nothing else on the link uses it.
const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const WAIT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------- helpers

/// A network namespace named `tsw-<pid>-<n>`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tsw-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n NS args…`, which must succeed.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth pair: `a_end` in `a`, `b_end` in `b`, both up.
fn veth(a: &Netns, a_end: &str, b: &Netns, b_end: &str) {
    a.ip(&[
        "link", "add", a_end, "type", "veth", "peer", "name", b_end, "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_end, "up"]);
    b.ip(&["link", "set", b_end, "up"]);
}

/// Records what the uplink hands to the switch.
#[derive(Default)]
struct Recorder {
    frames: Mutex<Vec<(PortId, Vec<u8>)>>,
    cv: Condvar,
    /// Times the uplink said its active member changed.
    member_changes: std::sync::atomic::AtomicUsize,
}

impl Ingress for Recorder {
    fn ingress(&self, port: PortId, frame: &[u8]) {
        self.frames.lock().unwrap().push((port, frame.to_vec()));
        self.cv.notify_all();
    }

    fn uplink_active_changed(&self, port: PortId) {
        assert_eq!(port, PORT);
        self.member_changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Recorder {
    /// The first recorded frame matching `pred`, waiting up to `timeout`.
    fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Option<(PortId, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let mut g = self.frames.lock().unwrap();
        loop {
            if let Some(f) = g.iter().find(|(_, f)| pred(f)) {
                return Some(f.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
    }

    fn has(&self, pred: impl Fn(&[u8]) -> bool) -> bool {
        self.frames.lock().unwrap().iter().any(|(_, f)| pred(f))
    }
}

/// A test frame: broadcast-free unicast to a made-up MAC, our ethertype
/// (after `tags`), a marker and padding to `len`.
fn frame(marker: u8, tags: &[[u8; 4]], len: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0xaa, 0, 0, 0, marker, 0x02, 0xbb, 0, 0, 0, marker];
    for t in tags {
        f.extend_from_slice(t);
    }
    f.extend_from_slice(&TEST_ETHERTYPE);
    f.push(marker);
    f.resize(len.max(f.len()), marker);
    f
}

fn is_marker(f: &[u8], marker: u8) -> bool {
    f.len() > 12 && f[5] == marker && f[11] == marker && f.windows(2).any(|w| w == TEST_ETHERTYPE)
}

/// A packet socket on one interface of a namespace: the test's view of the
/// wire. Receives with PACKET_AUXDATA so it can see stripped tags.
struct Wire {
    fd: OwnedFd,
}

impl Wire {
    fn open(ns: &Netns, ifname: &str) -> Wire {
        let ifname = ifname.to_owned();
        in_netns(&ns.path(), move || {
            let index = if_nametoindex(ifname.as_str())
                .unwrap_or_else(|e| panic!("no interface {ifname}: {e}"));
            let fd = socket::socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap_or_else(|e| panic!("socket: {e}"));
            // libc: nix has no sockopt for PACKET_AUXDATA.
            let one: libc::c_int = 1;
            // SAFETY: the option value is a live c_int of the stated size.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_AUXDATA,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0);
            // libc: nix's LinkAddr cannot be built from its fields; it
            // wraps a `sockaddr_ll` made here.
            // SAFETY: sockaddr_ll is plain old data; zero is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = index as i32;
            // SAFETY: `sll` is a live, initialised sockaddr_ll of the size
            // passed along.
            let addr = unsafe {
                LinkAddr::from_raw(
                    (&sll as *const libc::sockaddr_ll).cast(),
                    Some(std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t),
                )
            }
            .expect("an AF_PACKET sockaddr_ll");
            socket::bind(fd.as_raw_fd(), &addr).unwrap_or_else(|e| panic!("bind: {e}"));
            Wire { fd }
        })
        .unwrap()
    }

    fn send(&self, frame: &[u8]) {
        let n = socket::send(self.fd.as_raw_fd(), frame, MsgFlags::empty())
            .unwrap_or_else(|e| panic!("send: {e}"));
        assert_eq!(n, frame.len(), "send");
    }

    /// Receives frames (incoming only, tags put back from auxdata) until
    /// one matches `pred`, for at most `timeout`.
    fn recv_until(&self, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(left.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
            if !matches!(poll(&mut pfd, ms), Ok(n) if n > 0) {
                continue;
            }
            // libc: nix has no PACKET_AUXDATA control message (its recvmsg
            // hands such a message back opaque), so this recvmsg is libc's.
            let mut buf = vec![0u8; 65536];
            let mut control = [0u64; 16];
            // SAFETY: sockaddr_ll and msghdr are plain old data.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: as above.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut addr as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: every pointer in `msg` is live with the stated length.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
            if n < 0 {
                continue;
            }
            buf.truncate(n as usize);
            if addr.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            // SAFETY: walking the control buffer recvmsg filled; the
            // auxdata is read unaligned.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA
                    {
                        let aux: libc::tpacket_auxdata =
                            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                        if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                            let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                                aux.tp_vlan_tpid
                            } else {
                                0x8100
                            };
                            let mut tag = tpid.to_be_bytes().to_vec();
                            tag.extend_from_slice(&aux.tp_vlan_tci.to_be_bytes());
                            buf.splice(12..12, tag);
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            if pred(&buf) {
                return Some(buf);
            }
        }
    }
}

struct Rig {
    egress: Arc<EgressQueue>,
    counters: Arc<PortCounters>,
    rec: Arc<Recorder>,
}

impl Rig {
    fn new() -> Rig {
        Rig {
            egress: Arc::new(EgressQueue::new(256, 1 << 20).unwrap()),
            counters: Arc::new(PortCounters::default()),
            rec: Arc::new(Recorder::default()),
        }
    }

    fn spawn(&self, ns: &Netns, members: &[&str]) -> Result<UplinkHandle, UplinkError> {
        self.spawn_named(ns, "up0", members)
    }

    fn spawn_named(
        &self,
        ns: &Netns,
        name: &str,
        members: &[&str],
    ) -> Result<UplinkHandle, UplinkError> {
        let cfg = UplinkConfig {
            id: PORT,
            name: name.into(),
            interfaces: members.iter().map(|s| s.to_string()).collect(),
        };
        let (e, c, r) = (self.egress.clone(), self.counters.clone(), self.rec.clone());
        in_netns(&ns.path(), move || UplinkHandle::spawn(cfg, e, c, r)).unwrap()
    }
}

fn wait_active(up: &UplinkHandle, want: Option<&str>, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    while up.active().as_deref() != want {
        assert!(
            t0.elapsed() < timeout,
            "active is {:?}, wanted {want:?} within {timeout:?}",
            up.active()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

fn wait_until(timeout: Duration, what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn timed_shutdown(up: UplinkHandle) {
    let t0 = Instant::now();
    up.shutdown();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "shutdown took {:?}",
        t0.elapsed()
    );
}

// ------------------------------------------------------------------ tests

#[test]
fn frames_in_and_out() {
    let (a, b) = (Netns::new(), Netns::new());
    veth(&a, "u0", &b, "p0");
    let rig = Rig::new();
    let up = rig.spawn(&a, &["u0"]).unwrap();
    wait_active(&up, Some("u0"), WAIT);
    let wire = Wire::open(&b, "p0");

    // Wire → switch, byte for byte, with the port's id.
    let f = frame(1, &[], 100);
    wire.send(&f);
    let (port, got) = rig
        .rec
        .wait_for(WAIT, |g| is_marker(g, 1))
        .expect("frame from the wire");
    assert_eq!(port, PORT);
    assert_eq!(got, f);
    let mut min = frame(2, &[], 0);
    min.truncate(14);
    wire.send(&min);
    assert_eq!(rig.rec.wait_for(WAIT, |g| is_marker(g, 2)).unwrap().1, min);
    let s = rig.counters.snapshot();
    assert_eq!(s.rx_frames, 2);
    assert_eq!(s.rx_bytes, (f.len() + min.len()) as u64);

    // Switch → wire.
    let g = frame(3, &[], 200);
    assert!(rig.egress.push(g.clone()));
    assert_eq!(wire.recv_until(WAIT, |x| is_marker(x, 3)), Some(g.clone()));
    wait_until(WAIT, "tx counted", || {
        rig.counters.snapshot().tx_frames == 1
    });
    assert_eq!(rig.counters.snapshot().tx_bytes, g.len() as u64);
    // What the uplink sent is not taken back in as received.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !rig.rec.has(|x| is_marker(x, 3)),
        "own transmission re-ingested"
    );

    // Egress frames out of the size limits are dropped as malformed.
    assert!(rig.egress.push(vec![0xff; 13]));
    assert!(rig.egress.push(vec![0xff; 1523]));
    wait_until(WAIT, "malformed egress drops", || {
        rig.counters.snapshot().drops.malformed == 2
    });

    // A frame larger than MAX_FRAME from the wire (the links allow it) is
    // dropped as malformed, and the next one still gets through.
    a.ip(&["link", "set", "u0", "mtu", "3000"]);
    b.ip(&["link", "set", "p0", "mtu", "3000"]);
    wire.send(&frame(4, &[], 1600));
    wire.send(&frame(5, &[], 1522));
    assert_eq!(
        rig.rec.wait_for(WAIT, |g| is_marker(g, 5)).unwrap().1.len(),
        1522
    );
    wait_until(WAIT, "malformed ingress drop", || {
        rig.counters.snapshot().drops.malformed == 3
    });
    assert!(!rig.rec.has(|g| is_marker(g, 4)));
    timed_shutdown(up);
}

#[test]
fn vlan_tags_survive_the_kernel() {
    let (a, b) = (Netns::new(), Netns::new());
    veth(&a, "u0", &b, "p0");
    let rig = Rig::new();
    let up = rig.spawn(&a, &["u0"]).unwrap();
    wait_active(&up, Some("u0"), WAIT);
    let wire = Wire::open(&b, "p0");

    // 802.1Q, VID 10, priority 3: the kernel strips it on receive, the
    // uplink puts it back.
    let q = frame(10, &[[0x81, 0x00, 0x60, 0x0a]], 80);
    wire.send(&q);
    assert_eq!(rig.rec.wait_for(WAIT, |g| is_marker(g, 10)).unwrap().1, q);
    // Priority-only tag (VID 0).
    let p = frame(11, &[[0x81, 0x00, 0xa0, 0x00]], 80);
    wire.send(&p);
    assert_eq!(rig.rec.wait_for(WAIT, |g| is_marker(g, 11)).unwrap().1, p);
    // An all-zero TCI: only TP_STATUS_VLAN_VALID tells it from no tag.
    let z = frame(15, &[[0x81, 0x00, 0x00, 0x00]], 80);
    wire.send(&z);
    assert_eq!(rig.rec.wait_for(WAIT, |g| is_marker(g, 15)).unwrap().1, z);
    // Q-in-Q: outer 802.1ad VID 100 (stripped, TPID reported), inner
    // 802.1Q VID 10 (left in the data).
    let qq = frame(
        12,
        &[[0x88, 0xa8, 0x00, 0x64], [0x81, 0x00, 0x00, 0x0a]],
        80,
    );
    wire.send(&qq);
    assert_eq!(rig.rec.wait_for(WAIT, |g| is_marker(g, 12)).unwrap().1, qq);
    // A tagged frame of exactly MAX_FRAME on the wire.
    let big = frame(13, &[[0x81, 0x00, 0x00, 0x0a]], 1522);
    a.ip(&["link", "set", "u0", "mtu", "3000"]);
    b.ip(&["link", "set", "p0", "mtu", "3000"]);
    wire.send(&big);
    assert_eq!(rig.rec.wait_for(WAIT, |g| is_marker(g, 13)).unwrap().1, big);

    // Tagged egress leaves with its tag.
    let out = frame(14, &[[0x81, 0x00, 0x00, 0x14]], 90);
    assert!(rig.egress.push(out.clone()));
    assert_eq!(wire.recv_until(WAIT, |x| is_marker(x, 14)), Some(out));
    assert_eq!(rig.counters.snapshot().drops.malformed, 0);
    timed_shutdown(up);
}

/// Traffic from a local stack over a veth leaves the TCP/UDP checksum to
/// "hardware"; the uplink completes it.
#[test]
fn partial_checksums_are_completed() {
    let (a, b) = (Netns::new(), Netns::new());
    veth(&a, "u0", &b, "p0");
    b.ip(&["addr", "add", "10.98.0.1/24", "dev", "p0"]);
    b.ip(&[
        "neigh",
        "add",
        "10.98.0.2",
        "lladdr",
        "02:00:00:98:00:02",
        "dev",
        "p0",
    ]);
    let rig = Rig::new();
    let up = rig.spawn(&a, &["u0"]).unwrap();
    wait_active(&up, Some("u0"), WAIT);

    let payload = b"tandem uplink checksum test: odd length".to_vec();
    assert_eq!(payload.len() % 2, 1);
    in_netns(&b.path(), move || {
        let s = std::net::UdpSocket::bind("10.98.0.1:0").unwrap();
        s.send_to(&payload, "10.98.0.2:9999").unwrap();
    })
    .unwrap();
    let is_ours = |f: &[u8]| {
        f.len() >= 42
            && f[12..14] == [0x08, 0x00]
            && f[23] == 17
            && f[36..38] == 9999u16.to_be_bytes()
    };
    let (_, f) = rig.rec.wait_for(WAIT, is_ours).expect("UDP datagram");
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let udp = &f[14 + ihl..];
    assert_ne!(u16::from_be_bytes([udp[6], udp[7]]), 0, "checksum present");
    // Pseudo header + UDP segment must sum to 0xffff.
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for w in b.chunks(2) {
            let hi = u32::from(w[0]) << 8;
            let lo = w.get(1).copied().map_or(0, u32::from);
            sum += hi | lo;
        }
    };
    add(&f[26..34]);
    add(&[0, 17]);
    add(&(udp.len() as u16).to_be_bytes());
    add(udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff, "UDP checksum does not verify");
    timed_shutdown(up);
}

#[test]
fn failover_follows_carrier() {
    let (a, b) = (Netns::new(), Netns::new());
    veth(&a, "u0", &b, "p0");
    veth(&a, "u1", &b, "p1");
    let rig = Rig::new();
    let up = rig.spawn(&a, &["u0", "u1"]).unwrap();
    wait_active(&up, Some("u0"), WAIT);
    let (w0, w1) = (Wire::open(&b, "p0"), Wire::open(&b, "p1"));

    // Only the active member's traffic reaches the switch.
    w1.send(&frame(20, &[], 60));
    w0.send(&frame(21, &[], 60));
    assert!(rig.rec.wait_for(WAIT, |g| is_marker(g, 21)).is_some());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !rig.rec.has(|g| is_marker(g, 20)),
        "standby member's frame ingested"
    );

    // Carrier lost on u0 → u1 within 2 s, and egress leaves through p1.
    // The switch is told, so it can announce the VMs on the new member.
    let changes = || {
        rig.rec
            .member_changes
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = changes();
    assert!(before >= 1, "the first active member was announced too");
    b.ip(&["link", "set", "p0", "down"]);
    let took = wait_active(&up, Some("u1"), Duration::from_secs(2));
    eprintln!("failover to u1 took {took:?}");
    wait_until(WAIT, "member change reported", || changes() == before + 1);
    let g = frame(22, &[], 70);
    assert!(rig.egress.push(g.clone()));
    assert_eq!(w1.recv_until(WAIT, |x| is_marker(x, 22)), Some(g));
    w1.send(&frame(23, &[], 60));
    assert!(rig.rec.wait_for(WAIT, |g| is_marker(g, 23)).is_some());

    // u0 is preferred again once its carrier is back.
    b.ip(&["link", "set", "p0", "up"]);
    wait_active(&up, Some("u0"), WAIT);
    let g = frame(24, &[], 70);
    assert!(rig.egress.push(g.clone()));
    assert_eq!(w0.recv_until(WAIT, |x| is_marker(x, 24)), Some(g));

    // A member that disappears is just down; with no member up, egress is
    // dropped as NoBuffer.
    a.ip(&["link", "del", "u1"]);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(up.active().as_deref(), Some("u0"));
    b.ip(&["link", "set", "p0", "down"]);
    wait_active(&up, None, Duration::from_secs(2));
    let before = rig.counters.snapshot().drops.no_buffer;
    assert!(rig.egress.push(frame(25, &[], 60)));
    wait_until(WAIT, "no-buffer drop", || {
        rig.counters.snapshot().drops.no_buffer == before + 1
    });

    // It comes back under the same name: a new socket, and it takes over.
    veth(&a, "u1", &b, "p1");
    wait_active(&up, Some("u1"), WAIT);
    let w1 = Wire::open(&b, "p1");
    let g = frame(26, &[], 70);
    assert!(rig.egress.push(g.clone()));
    assert_eq!(w1.recv_until(WAIT, |x| is_marker(x, 26)), Some(g));
    w1.send(&frame(27, &[], 60));
    assert!(rig.rec.wait_for(WAIT, |g| is_marker(g, 27)).is_some());
    timed_shutdown(up);
}

#[test]
fn configuration_errors_name_the_interface() {
    let a = Netns::new();
    let b = Netns::new();
    veth(&a, "u0", &b, "p0");
    let rig = Rig::new();
    let e = rig
        .spawn(&a, &["u0", "nosuch0"])
        .err()
        .expect("missing member");
    assert!(
        matches!(&e, UplinkError::NoSuchInterface { interface, .. } if interface == "nosuch0"),
        "{e:?}"
    );
    assert!(e.to_string().contains("nosuch0"), "{e}");
    let e = rig.spawn(&a, &[]).err().expect("no members");
    assert!(matches!(e, UplinkError::NoMembers { .. }), "{e:?}");
    let e = rig.spawn(&a, &["u0", "u0"]).err().expect("duplicate");
    assert!(e.to_string().contains("u0"), "{e}");
    let e = rig
        .spawn(&a, &["a234567890123456"])
        .err()
        .expect("long name");
    assert!(matches!(e, UplinkError::InvalidName { .. }), "{e:?}");

    // A member that exists but is down: spawn works, nothing is active.
    b.ip(&["link", "set", "p0", "down"]);
    let up = rig.spawn(&a, &["u0"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(up.active(), None);
    timed_shutdown(up);
}

/// CPU time (user + system, in clock ticks) of this process's threads
/// named `comm`.
fn thread_ticks(comm: &str) -> Option<u64> {
    let mut found = None;
    for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = t.path();
        // Threads of other tests come and go while this runs: one that
        // vanished between read_dir and here is simply not ours.
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if name.trim() != comm {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // Fields after the parenthesised name: state is field 3, utime 14,
        // stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        found = Some(found.unwrap_or(0) + ticks);
    }
    found
}

/// An idle uplink (and one with no member up, and one whose egress
/// meets a full queue of drops) sleeps in poll rather than spinning.
#[test]
fn idle_uplink_does_not_spin() {
    let (a, b) = (Netns::new(), Netns::new());
    veth(&a, "u0", &b, "p0");
    veth(&a, "u1", &b, "p1");
    b.ip(&["link", "set", "p1", "down"]);
    let rig = Rig::new();
    let up = rig.spawn_named(&a, "idlecheck", &["u1", "u0"]).unwrap();
    wait_active(&up, Some("u0"), WAIT);
    for i in 0..50 {
        assert!(rig.egress.push(frame(i, &[], 60)));
    }
    // Listing /proc/self/task while other tests' threads come and go can
    // miss ours once (CI saw it); look again, a bounded number of times.
    let find = || {
        (0..20).find_map(|_| {
            let t = thread_ticks("uplink-idlechec");
            if t.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            t
        })
    };
    let before = find().expect("uplink thread");
    std::thread::sleep(Duration::from_secs(1));
    let used = find().expect("uplink thread") - before;
    assert!(used <= 10, "uplink thread used {used} ticks in 1 s");
    assert_eq!(rig.counters.snapshot().tx_frames, 50);
    timed_shutdown(up);
}

/// The whole switch (`SwitchHost`) in namespace A: uplink `up` on `ul0`
/// (active) and `ul1` (standby), whose peers `pl0`/`pl1` are in B, and a
/// host port (tap `tl0`) in the same VLAN. B plays a top-of-rack switch
/// that speaks LLDP: its frames, written by the `lldp` module's encoder and
/// sent through packet sockets, are heard on both members, shown with the
/// document's declared neighbour, never reach the tap, and are forgotten
/// when their 2 s TTL runs out.
#[test]
fn lldp_neighbours_are_heard_not_forwarded_and_expire() {
    use tandem_switch::frame::Mac;
    use tandem_switch::host::SwitchHost;
    use tandem_switch::lldp::{self, LldpId, LldpNeighbour, UplinkNeighbour};

    /// Stops the switch (and its tap) before the namespaces go.
    struct Running(Arc<SwitchHost>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.shutdown();
        }
    }

    let (a, b) = (Netns::new(), Netns::new());
    veth(&a, "ul0", &b, "pl0");
    veth(&a, "ul1", &b, "pl1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switch.toml");
    std::fs::write(
        &path,
        r#"
[[port_group]]
name = "lan"
vlan = 10

[[uplink]]
name = "up"
interfaces = ["ul0", "ul1"]
port_group = "lan"
neighbour = "tor-1 Ethernet12"

[[host_port]]
name = "mgmt"
tap = "tl0"
port_group = "lan"
"#,
    )
    .unwrap();
    let host = in_netns(&a.path(), || SwitchHost::start(&path))
        .unwrap()
        .unwrap_or_else(|e| panic!("start: {e}"));
    let host = Running(host);
    let host = &*host.0;
    assert_eq!(
        host.document().uplinks[0].neighbour.as_deref(),
        Some("tor-1 Ethernet12")
    );
    wait_until(WAIT, "ul0 active", || {
        host.stats().uplinks_active.get("up") == Some(&Some("ul0".into()))
    });
    let member = |m: &str| -> UplinkNeighbour {
        host.uplink_neighbours()
            .into_iter()
            .find(|n| n.uplink == "up" && n.member == m)
            .unwrap_or_else(|| panic!("no member {m}"))
    };
    assert_eq!(member("ul0").neighbour, None);

    let (wire0, wire1) = (Wire::open(&b, "pl0"), Wire::open(&b, "pl1"));
    let tap = Wire::open(&a, "tl0");
    // The path is open: a frame B sends reaches the host's tap.
    wire0.send(&frame(1, &[], 60));
    tap.recv_until(WAIT, |f| is_marker(f, 1))
        .expect("the switch forwards from the uplink to the tap");

    let tor = LldpNeighbour {
        chassis_id: LldpId::Mac(Mac([0x02, 0x1c, 0x73, 0, 0, 1])),
        port_id: LldpId::InterfaceName("Ethernet12".into()),
        system_name: Some("tor-1".into()),
        port_description: Some("host7 eth1".into()),
        ttl_s: 2,
    };
    let src = Mac([0x02, 0x1c, 0x73, 0, 0, 0x12]);
    let sent = Instant::now();
    wire0.send(&lldp::encode_frame(src, &tor).unwrap());
    // Sent after the LLDP frame along the same path: if the LLDP frame
    // were forwarded it would reach the tap first.
    wire0.send(&frame(2, &[], 60));
    let standby = LldpNeighbour {
        port_id: LldpId::InterfaceName("Ethernet13".into()),
        ..tor.clone()
    };
    wire1.send(&lldp::encode_frame(src, &standby).unwrap());

    wait_until(WAIT, "the neighbour on ul0", || {
        member("ul0").neighbour.as_ref() == Some(&tor)
    });
    wait_until(WAIT, "the neighbour on the standby ul1", || {
        member("ul1").neighbour.as_ref() == Some(&standby)
    });
    let first = tap
        .recv_until(WAIT, |f| is_marker(f, 2) || lldp::is_lldp(f))
        .expect("the frame sent after the LLDP frame");
    assert!(!lldp::is_lldp(&first), "LLDP forwarded to the host port");
    assert_eq!(
        tap.recv_until(Duration::from_millis(300), lldp::is_lldp),
        None,
        "LLDP forwarded to the host port"
    );
    let m = member("ul0");
    assert_eq!((m.lldp_frames, m.lldp_errors), (1, 0));
    assert!(m.age_ms.is_some_and(|ms| ms < 2000), "{m:?}");
    assert_eq!(
        tor.to_string(),
        "tor-1 Ethernet12 (chassis 02:1c:73:00:00:01)"
    );

    // `tandem switch stats` carries it.
    let json = serde_json::to_value(host.stats()).unwrap();
    let shown = json["uplink_neighbours"]
        .as_array()
        .expect("uplink_neighbours in the stats")
        .iter()
        .find(|n| n["member"] == "ul0")
        .expect("ul0 in the stats")
        .clone();
    assert_eq!(shown["neighbour"]["system_name"], "tor-1", "{shown}");
    assert_eq!(
        shown["neighbour"]["port_id"]["interface-name"], "Ethernet12",
        "{shown}"
    );

    // An LLDP frame that is not a valid LLDPDU is counted and changes
    // nothing.
    let mut bad = lldp::encode_frame(src, &tor).unwrap();
    bad[14..16].copy_from_slice(&[0x06, 0x02]);
    wire0.send(&bad);
    wait_until(WAIT, "the invalid frame counted", || {
        member("ul0").lldp_errors == 1
    });
    assert_eq!(member("ul0").neighbour.as_ref(), Some(&tor));

    // Not heard again: gone once its TTL has run out, and not before.
    wait_until(Duration::from_secs(6), "the neighbour to expire", || {
        member("ul0").neighbour.is_none() && member("ul1").neighbour.is_none()
    });
    let gone_at = sent.elapsed();
    assert!(
        gone_at >= Duration::from_millis(1900),
        "forgotten after {gone_at:?}, TTL 2 s"
    );
    assert_eq!(member("ul0").lldp_frames, 2);
}
