//! The host port against a real tap, inside a network namespace created
//! for the test (needs root). The test's Ingress plays a neighbour at
//! 10.99.0.2: it answers ARP for it through the port's egress queue.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
};
use tandem_switch::hostport::{HostPortConfig, HostPortError, HostPortHandle};
use tandem_switch::netsys::in_netns;
use tandem_switch::port::{EgressQueue, Ingress, PortCounters, PortId};

const PORT: PortId = 3;
const TAP: &str = "tswhost0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x99, 0x00, 0x02];
const WAIT: Duration = Duration::from_secs(3);

/// A network namespace named `tsw-<pid>-<n>`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tsw-{}-h{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n NS args…`: success and stdout.
    fn ip(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn ip_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.ip(args);
        assert!(ok, "ip -n {} {args:?} failed", self.name);
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Records every frame and answers ARP requests for [`PEER_IP`].
struct Neighbour {
    egress: Arc<EgressQueue>,
    frames: Mutex<Vec<(PortId, Vec<u8>)>>,
    cv: Condvar,
}

impl Ingress for Neighbour {
    fn ingress(&self, port: PortId, frame: &[u8]) {
        if let Some(reply) = arp_reply(frame) {
            assert!(self.egress.push(reply));
        }
        self.frames.lock().unwrap().push((port, frame.to_vec()));
        self.cv.notify_all();
    }
}

impl Neighbour {
    fn wait_for(&self, pred: impl Fn(&[u8]) -> bool) -> Option<(PortId, Vec<u8>)> {
        let deadline = Instant::now() + WAIT;
        let mut g = self.frames.lock().unwrap();
        loop {
            if let Some(f) = g.iter().find(|(_, f)| pred(f)) {
                return Some(f.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
    }
}

fn is_arp_request_for_peer(f: &[u8]) -> bool {
    f.len() >= 42
        && f[12..14] == [0x08, 0x06]
        && f[20..22] == [0, 1]
        && f[38..42] == PEER_IP.octets()
}

fn arp_reply(req: &[u8]) -> Option<Vec<u8>> {
    if !is_arp_request_for_peer(req) {
        return None;
    }
    let (sha, spa) = (&req[22..28], &req[28..32]);
    let mut r = Vec::with_capacity(42);
    r.extend_from_slice(sha);
    r.extend_from_slice(&PEER_MAC);
    r.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    r.extend_from_slice(&PEER_MAC);
    r.extend_from_slice(&PEER_IP.octets());
    r.extend_from_slice(sha);
    r.extend_from_slice(spa);
    Some(r)
}

fn is_echo_request_to_peer(f: &[u8]) -> bool {
    f.len() >= 42
        && f[12..14] == [0x08, 0x00]
        && f[23] == 1
        && f[30..34] == PEER_IP.octets()
        && f[14 + usize::from(f[14] & 0x0f) * 4] == 8
}

/// Sends one ICMP echo request to `dst` from inside `ns` (what `ping -c1`
/// would do; no ping binary needed).
fn send_echo_request(ns: &Netns, dst: Ipv4Addr) {
    in_netns(&ns.path(), move || {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Icmp,
        )
        .unwrap_or_else(|e| panic!("socket: {e}"));
        let mut icmp = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend_from_slice(b"tandem host port");
        let mut sum: u32 = icmp
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let to = SockaddrIn::from(SocketAddrV4::new(dst, 0));
        let n = socket::sendto(fd.as_raw_fd(), &icmp, &to, MsgFlags::empty())
            .unwrap_or_else(|e| panic!("sendto: {e}"));
        assert_eq!(n, icmp.len(), "sendto");
    })
    .unwrap();
}

struct Rig {
    egress: Arc<EgressQueue>,
    counters: Arc<PortCounters>,
    nb: Arc<Neighbour>,
}

impl Rig {
    fn new() -> Rig {
        let egress = Arc::new(EgressQueue::new(256, 1 << 20).unwrap());
        Rig {
            egress: egress.clone(),
            counters: Arc::new(PortCounters::default()),
            nb: Arc::new(Neighbour {
                egress,
                frames: Mutex::new(Vec::new()),
                cv: Condvar::new(),
            }),
        }
    }

    fn spawn(&self, ns: &Netns, tap: &str) -> Result<HostPortHandle, HostPortError> {
        let cfg = HostPortConfig {
            id: PORT,
            name: "host".into(),
            tap: tap.into(),
        };
        let (e, c, i) = (self.egress.clone(), self.counters.clone(), self.nb.clone());
        in_netns(&ns.path(), move || HostPortHandle::spawn(cfg, e, c, i)).unwrap()
    }
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn host_stack_reaches_the_switch_and_back() {
    let ns = Netns::new();
    let rig = Rig::new();
    let port = rig.spawn(&ns, TAP).unwrap();
    assert_eq!(port.tap(), TAP);
    let link = ns.ip_ok(&["-o", "link", "show", TAP]);
    assert!(
        link.contains("<BROADCAST,MULTICAST,UP"),
        "tap not up: {link}"
    );
    ns.ip_ok(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);

    send_echo_request(&ns, PEER_IP);
    // The host asks for the peer's MAC…
    let (p, req) = rig
        .nb
        .wait_for(is_arp_request_for_peer)
        .expect("ARP request");
    assert_eq!(p, PORT);
    assert_eq!(
        &req[28..32],
        &HOST_IP.octets(),
        "sender is the host's address"
    );
    // …our reply goes in through egress, and the echo request follows,
    // addressed to the MAC we answered with.
    let (_, echo) = rig
        .nb
        .wait_for(is_echo_request_to_peer)
        .expect("ICMP echo request");
    assert_eq!(&echo[0..6], &PEER_MAC);
    assert_eq!(&echo[6..12], &req[6..12]);
    let neigh = ns.ip_ok(&["neigh", "show", &PEER_IP.to_string()]);
    assert!(
        neigh.contains("02:00:00:99:00:02"),
        "neighbour entry: {neigh}"
    );

    let s = rig.counters.snapshot();
    assert!(s.rx_frames >= 2, "{s:?}");
    // The ARP reply (twice if the host asked again meanwhile).
    assert!(s.tx_frames >= 1, "{s:?}");
    assert_eq!(s.tx_bytes, 42 * s.tx_frames);

    // Out-of-limit egress frames are dropped as malformed.
    assert!(rig.egress.push(vec![0; 13]));
    assert!(rig.egress.push(vec![0; 1600]));
    wait_until("malformed drops", || {
        rig.counters.snapshot().drops.malformed == 2
    });

    // Shutdown is quick and the tap goes away with the port.
    let t0 = Instant::now();
    port.shutdown();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let (exists, _) = ns.ip(&["link", "show", TAP]);
    assert!(!exists, "tap outlived the port");
}

#[test]
fn creation_errors_name_the_tap() {
    let ns = Netns::new();
    let rig = Rig::new();
    let port = rig.spawn(&ns, TAP).unwrap();
    let e = rig
        .spawn(&ns, TAP)
        .err()
        .expect("second tap of the same name");
    assert!(
        matches!(&e, HostPortError::Exists { tap, .. } if tap == TAP),
        "{e:?}"
    );
    assert!(e.to_string().contains(TAP), "{e}");
    // The failed attempt did not disturb the first port's tap.
    ns.ip_ok(&["link", "show", TAP]);
    port.shutdown();

    // Any interface of that name, not only a tap.
    ns.ip_ok(&[
        "link", "add", "tswv0", "type", "veth", "peer", "name", "tswv1",
    ]);
    let e = rig.spawn(&ns, "tswv0").err().expect("name taken by a veth");
    assert!(matches!(e, HostPortError::Exists { .. }), "{e:?}");
    assert!(e.to_string().contains("tswv0"), "{e}");

    for bad in ["a234567890123456", "", "tap%d", "a/b"] {
        let e = rig.spawn(&ns, bad).err().expect("bad name");
        assert!(
            matches!(e, HostPortError::InvalidName { .. }),
            "{bad:?}: {e:?}"
        );
    }
}

#[test]
fn tap_deleted_under_the_port() {
    let ns = Netns::new();
    let rig = Rig::new();
    let port = rig.spawn(&ns, TAP).unwrap();
    ns.ip_ok(&["link", "del", TAP]);
    std::thread::sleep(Duration::from_millis(100));
    assert!(rig.egress.push(vec![0xff; 60]));
    wait_until("no-buffer drop", || {
        rig.counters.snapshot().drops.no_buffer == 1
    });
    let t0 = Instant::now();
    port.shutdown();
    assert!(t0.elapsed() < Duration::from_secs(1));
}
