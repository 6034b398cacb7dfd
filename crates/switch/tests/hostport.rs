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

// ------------------------------------------- the document's addressing

/// The whole switch (`SwitchHost`) in namespace S: a host port `mgmt`
/// (tap `tswt0`) and an uplink on veth `tswu0`, whose peer `tswp0` is in
/// namespace P (10.97.0.2). P reaches the host's stack in S only through
/// the uplink, the switch and the tap.
mod addressing {
    use super::*;
    use tandem_switch::host::{HostError, SwitchHost};
    use tandem_switch::port::CounterSnapshot;

    const PEER: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);
    const FIRST: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
    const MOVED: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 3);
    /// How long a reply may take to come (ARP included) …
    const ANSWER: Duration = Duration::from_secs(5);
    /// … and how long an address is pinged before it counts as silent.
    const SILENT: Duration = Duration::from_millis(1500);

    fn doc(host: &str, up: &str) -> String {
        format!(
            r#"
[[port_group]]
name = "mgmt"
vlan = 10
{host}

[[port_group]]
name = "wire"
vlan = 10

[[uplink]]
name = "up"
port_group = "wire"
{up}

[[host_port]]
name = "mgmt"
tap = "tswt0"
port_group = "mgmt"
"#
        )
    }

    /// The document with the host port's `addresses`/`mtu` lines, the
    /// uplink's `interfaces`/`mtu` lines, and `blocked` for `mgmt`.
    fn document(addressing: &str, uplink: &str, blocked: bool) -> String {
        let d = doc(if blocked { "blocked = true" } else { "" }, uplink);
        d + addressing + "\n"
    }

    /// Stops the switch (and its taps) before the namespaces go.
    struct Running(Arc<SwitchHost>);

    impl Drop for Running {
        fn drop(&mut self) {
            self.0.shutdown();
        }
    }

    fn apply(s: &Netns, host: &SwitchHost, text: &str) -> Result<(), HostError> {
        let d = tandem_switch::config::SwitchDocument::from_toml(text).expect("parses");
        in_netns(&s.path(), || host.apply(d).map(|_| ())).unwrap()
    }

    fn write_proc(ns: &Netns, path: &'static str, value: &'static str) {
        // /proc/sys/net is the namespace of the thread that opens it.
        in_netns(&ns.path(), move || std::fs::write(path, value))
            .unwrap()
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }

    /// `(ifindex, mtu)` of `dev` in `ns`, from `ip -o link show`.
    fn link(ns: &Netns, dev: &str) -> (u32, u32) {
        let out = ns.ip_ok(&["-o", "link", "show", dev]);
        let index = out.split(':').next().unwrap().trim().parse().unwrap();
        let mut words = out.split_whitespace();
        words.find(|w| *w == "mtu").expect("mtu in ip link output");
        (index, words.next().unwrap().parse().unwrap())
    }

    fn counters(host: &SwitchHost, port: &str) -> CounterSnapshot {
        host.stats()
            .ports
            .into_iter()
            .find(|p| p.name == port)
            .unwrap_or_else(|| panic!("no port {port}"))
            .counters
    }

    fn icmp_echo(id: u16, seq: u16, payload: usize) -> Vec<u8> {
        let mut icmp = vec![8u8, 0, 0, 0];
        icmp.extend_from_slice(&id.to_be_bytes());
        icmp.extend_from_slice(&seq.to_be_bytes());
        icmp.resize(8 + payload, 0xa5);
        let mut sum: u32 = icmp
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        icmp
    }

    /// Pings `dst` from `ns` with `payload` bytes (one request per 200 ms,
    /// at most 50) until it answers or `within` has passed.
    fn answers(ns: &Netns, dst: Ipv4Addr, payload: usize, within: Duration) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        in_netns(&ns.path(), move || {
            let fd = socket::socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Icmp,
            )
            .unwrap_or_else(|e| panic!("socket: {e}"));
            let id = std::process::id() as u16 ^ 0x7a3d;
            let deadline = Instant::now() + within;
            let to = SockaddrIn::from(SocketAddrV4::new(dst, 0));
            let mut buf = vec![0u8; 4096];
            for seq in 1..=50u16 {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let icmp = icmp_echo(id, seq, payload);
                socket::sendto(fd.as_raw_fd(), &icmp, &to, MsgFlags::empty())
                    .unwrap_or_else(|e| panic!("sendto: {e}"));
                let round = (now + Duration::from_millis(200)).min(deadline);
                while let Some(left) = round.checked_duration_since(Instant::now()) {
                    let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                    let ms = PollTimeout::try_from(left.as_millis().max(1) as u64)
                        .unwrap_or(PollTimeout::MAX);
                    if !matches!(poll(&mut pfd, ms), Ok(n) if n > 0) {
                        continue;
                    }
                    let Ok(n) = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
                    else {
                        continue;
                    };
                    let p = &buf[..n];
                    let ihl = usize::from(p.first().copied().unwrap_or(0) & 0x0f) * 4;
                    let reply = p.len() >= ihl + 8
                        && p[12..16] == dst.octets()
                        && p[ihl] == 0
                        && p[ihl + 4..ihl + 6] == id.to_be_bytes();
                    if reply {
                        return true;
                    }
                }
            }
            false
        })
        .unwrap()
    }

    #[test]
    fn a_host_ports_address_moves_mtu_is_set_and_a_blocked_group_cuts_it() {
        let s = Netns::new();
        let p = Netns::new();
        for ns in [&s, &p] {
            ns.ip_ok(&["link", "set", "lo", "up"]);
        }
        s.ip_ok(&[
            "link", "add", "tswu0", "type", "veth", "peer", "name", "tswp0", "netns", &p.name,
        ]);
        s.ip_ok(&["link", "set", "tswu0", "up"]);
        p.ip_ok(&["link", "set", "tswp0", "up"]);
        p.ip_ok(&["addr", "add", &format!("{PEER}/24"), "dev", "tswp0"]);
        // S has no address on the uplink's member, but Linux answers ARP
        // for any of its addresses on any interface: without this P
        // would reach S around the switch.
        write_proc(&s, "/proc/sys/net/ipv4/conf/tswu0/arp_ignore", "1");
        let (_, member_mtu) = link(&s, "tswu0");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switch.toml");
        let up = "interfaces = [\"tswu0\"]";
        let v1 = document(
            &format!("addresses = [\"{FIRST}/24\"]\nmtu = 1400"),
            &format!("{up}\nmtu = 1450"),
            false,
        );
        std::fs::write(&path, &v1).unwrap();
        let host = in_netns(&s.path(), || SwitchHost::start(&path))
            .unwrap()
            .unwrap_or_else(|e| panic!("start: {e}"));
        let host = Running(host);
        let host = &*host.0;

        // The address is on the tap, which is up with its MTU; the uplink's
        // member has its MTU; P reaches the host through the switch.
        let addrs = s.ip_ok(&["-o", "addr", "show", "dev", "tswt0"]);
        assert!(addrs.contains(&format!("inet {FIRST}/24")), "{addrs}");
        assert!(
            s.ip_ok(&["-o", "link", "show", "tswt0"]).contains(",UP"),
            "tap up"
        );
        let (tap_index, tap_mtu) = link(&s, "tswt0");
        assert_eq!(tap_mtu, 1400);
        assert_eq!(link(&s, "tswu0").1, 1450);
        assert!(answers(&p, FIRST, 56, ANSWER), "{FIRST} answers");
        // Over the tap's MTU: the switch drops it on the way to the tap.
        let before = counters(host, "mgmt").drops.mtu;
        assert!(!answers(&p, FIRST, 1420, SILENT), "1448-byte packet");
        assert!(counters(host, "mgmt").drops.mtu > before);
        assert!(answers(&p, FIRST, 1300, ANSWER));

        // The address moves: the old one goes silent, the new one answers,
        // and the tap is the same one (changed in place). The uplink's
        // member gets its own MTU back when the document stops setting one.
        let v2 = document(
            &format!("addresses = [\"{MOVED}/24\"]\nmtu = 1400"),
            up,
            false,
        );
        apply(&s, host, &v2).unwrap();
        assert_eq!(link(&s, "tswt0"), (tap_index, 1400), "tap not recreated");
        assert_eq!(link(&s, "tswu0").1, member_mtu, "MTU given back");
        assert!(answers(&p, MOVED, 56, ANSWER), "{MOVED} answers");
        assert!(!answers(&p, FIRST, 56, SILENT), "{FIRST} still answers");

        // Blocked: nothing gets through, and the drops say why.
        let blocked = document(
            &format!("addresses = [\"{MOVED}/24\"]\nmtu = 1400"),
            up,
            true,
        );
        apply(&s, host, &blocked).unwrap();
        let before = counters(host, "mgmt").drops.blocked;
        assert!(!answers(&p, MOVED, 56, SILENT), "blocked, yet answers");
        assert!(counters(host, "mgmt").drops.blocked > before);
        assert_eq!(link(&s, "tswt0").0, tap_index, "blocking keeps the port");
        // Unblocked: the same ports forward again.
        apply(&s, host, &v2).unwrap();
        assert!(answers(&p, MOVED, 56, ANSWER), "unblocked, still silent");
        assert_eq!(link(&s, "tswt0").0, tap_index);

        // All or nothing: an address the kernel refuses (IPv6 is off on
        // the tap) fails the apply, names the field, and leaves the
        // addresses and MTU as they were.
        write_proc(&s, "/proc/sys/net/ipv6/conf/tswt0/disable_ipv6", "1");
        let bad = document(
            "addresses = [\"10.97.0.5/24\", \"fd00:97::1/64\"]\nmtu = 1300",
            up,
            false,
        );
        let e = apply(&s, host, &bad).expect_err("IPv6 is disabled on the tap");
        assert!(
            matches!(&e, HostError::Field { field, .. } if field == "host_port[0].addresses[1]"),
            "{e:?}"
        );
        assert!(e.to_string().contains("host port `mgmt`"), "{e}");
        let addrs = s.ip_ok(&["-o", "addr", "show", "dev", "tswt0"]);
        assert!(addrs.contains(&format!("inet {MOVED}/24")), "{addrs}");
        assert!(!addrs.contains("10.97.0.5"), "{addrs}");
        assert_eq!(link(&s, "tswt0"), (tap_index, 1400));
        assert_eq!(
            host.document(),
            tandem_switch::config::SwitchDocument::from_toml(&v2).unwrap()
        );
        assert!(answers(&p, MOVED, 56, ANSWER), "after the failed apply");

        // An uplink member that does not exist is refused before anything
        // changes, by its field.
        let missing = document(
            &format!("addresses = [\"{MOVED}/24\"]\nmtu = 1400"),
            "interfaces = [\"tswu0\", \"tswnone0\"]",
            false,
        );
        let e = apply(&s, host, &missing).expect_err("no such interface");
        match &e {
            HostError::Invalid(inv) => {
                let fields: Vec<&str> = inv.0.iter().map(|p| p.field.as_str()).collect();
                assert_eq!(fields, vec!["uplink[0].interfaces[1]"], "{e}");
            }
            e => panic!("{e:?}"),
        }
        assert!(answers(&p, MOVED, 56, ANSWER), "after the refused apply");

        // A member without carrier is accepted: that change really cuts
        // the host off, and going back really restores it.
        s.ip_ok(&[
            "link", "add", "tswn0", "type", "veth", "peer", "name", "tswn1",
        ]);
        s.ip_ok(&["link", "set", "tswn0", "up"]);
        let dead = document(
            &format!("addresses = [\"{MOVED}/24\"]\nmtu = 1400"),
            "interfaces = [\"tswn0\"]",
            false,
        );
        apply(&s, host, &dead).unwrap();
        assert_eq!(host.stats().uplinks_active.get("up"), Some(&None));
        assert!(!answers(&p, MOVED, 56, SILENT), "cut off, yet answers");
        apply(&s, host, &v2).unwrap();
        assert!(answers(&p, MOVED, 56, ANSWER), "restored, still silent");
    }
}
