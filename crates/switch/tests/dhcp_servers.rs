//! Lease queries and assisted renewals against real DHCP servers: ISC
//! dhcpd and dnsmasq, each in its own pair of network namespaces joined by
//! a veth (server 10.45.0.1/24, client 10.45.0.2/24). Needs root and the
//! servers (ci/setup-host.sh installs them); skips with a reason without.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_switch::dhcp::{
    encode_discover, encode_select_request, parse_bootp, BindingTable, DhcpMessage, MessageType,
    Snooped, CLIENT_PORT, SERVER_PORT,
};
use tandem_switch::dhcp_client::{
    assisted_renew, lease_query, lease_query_with_reply, LeaseQueryAnswer,
};
use tandem_switch::frame::Mac;

const DHCPD: &str = "/usr/sbin/dhcpd";
const DNSMASQ: &str = "/usr/sbin/dnsmasq";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 45, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 45, 0, 2);
const SERVER_VETH: &str = "veth-s";
const CLIENT_VETH: &str = "veth-c";
const LEASED_MAC: Mac = Mac([0x0a, 0, 0, 0, 0, 0x42]);
const UNKNOWN_MAC: Mac = Mac([0x0a, 0, 0, 0, 0, 0x99]);

fn skip_reason(server: &str) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (namespaces and port 67 need it)".into());
    }
    if !Path::new(server).exists() {
        return Some(format!(
            "{server} is not installed (ci/setup-host.sh installs it)"
        ));
    }
    None
}

fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth, deleted (with the veth) on drop,
/// panics included.
struct Namespaces {
    server: String,
    client: String,
}

impl Namespaces {
    /// `tag` keeps tests of the same process (same pid) apart.
    fn new(tag: &str) -> Self {
        let base = format!("tdm-dhcp-{}-{tag}", std::process::id());
        let ns = Namespaces {
            server: format!("{base}-s"),
            client: format!("{base}-c"),
        };
        for name in [&ns.server, &ns.client] {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            run(&["ip", "netns", "add", name]);
        }
        run(&[
            "ip",
            "-n",
            &ns.server,
            "link",
            "add",
            SERVER_VETH,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_VETH,
            "netns",
            &ns.client,
        ]);
        for (name, veth, addr) in [
            (&ns.server, SERVER_VETH, "10.45.0.1/24"),
            (&ns.client, CLIENT_VETH, "10.45.0.2/24"),
        ] {
            run(&["ip", "-n", name, "addr", "add", addr, "dev", veth]);
            run(&["ip", "-n", name, "link", "set", veth, "up"]);
            run(&["ip", "-n", name, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// Runs `f` on a thread inside namespace `name`, so its sockets live
    /// there; a panic in it is the test's.
    fn within<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{name}");
        let thread = std::thread::spawn(move || {
            let ns = File::open(&path).expect("open netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        });
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// A server process, killed on drop; its log is printed then, so a
/// failing test shows what the server thought.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(ns: &str, argv: &[&str], log: PathBuf) -> Self {
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start server");
        Daemon { child, log }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        eprintln!("--- {} ---\n{log}", self.log.display());
    }
}

/// Waits on `sock` for a reply with `xid` and `want` type; bounded by
/// `wait`.
fn await_reply(
    sock: &UdpSocket,
    xid: u32,
    want: MessageType,
    wait: Duration,
) -> Option<DhcpMessage> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    for _ in 0..64 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).ok()?;
        let Ok((len, _)) = sock.recv_from(&mut buf) else {
            return None;
        };
        if let Ok(msg) = parse_bootp(&buf[..len]) {
            if msg.xid == xid && msg.message_type == Some(want) {
                return Some(msg);
            }
        }
    }
    None
}

/// DISCOVER, OFFER, REQUEST, ACK from the client namespace, as `mac`,
/// repeated until the server (which may still be starting) answers:
/// at most 30 rounds and 10 seconds. Returns the ACK.
fn obtain_lease(client_ns: &str, mac: Mac) -> DhcpMessage {
    Namespaces::within(client_ns, move || {
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT)).unwrap();
        let server = SocketAddrV4::new(SERVER_IP, SERVER_PORT);
        let deadline = Instant::now() + Duration::from_secs(10);
        for round in 0..30u32 {
            assert!(
                Instant::now() < deadline,
                "no lease from the server in 10 s"
            );
            let xid = 0x7a00_0000 | round;
            sock.send_to(&encode_discover(xid, mac, None), server)
                .unwrap();
            let Some(offer) =
                await_reply(&sock, xid, MessageType::Offer, Duration::from_millis(300))
            else {
                continue;
            };
            let offered_by = offer.server_id.unwrap_or(SERVER_IP);
            let request = encode_select_request(xid, mac, offer.yiaddr, offered_by, None);
            sock.send_to(&request, server).unwrap();
            if let Some(ack) = await_reply(&sock, xid, MessageType::Ack, Duration::from_secs(1)) {
                assert_eq!(ack.yiaddr, offer.yiaddr);
                return ack;
            }
        }
        panic!("no lease from the server after 30 rounds");
    })
}

#[test]
fn dhcpd_answers_lease_queries_sent_as_a_relay() {
    if let Some(why) = skip_reason(DHCPD) {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Namespaces::new("isc");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("dhcpd.conf");
    let leases = dir.path().join("dhcpd.leases");
    std::fs::write(
        &conf,
        "authoritative;\nallow leasequery;\nping-check false;\n\
         default-lease-time 3600;\nmax-lease-time 3600;\n\
         subnet 10.45.0.0 netmask 255.255.255.0 { range 10.45.0.100 10.45.0.150; }\n",
    )
    .unwrap();
    std::fs::write(&leases, "").unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let (conf, leases, pid) = (
        path(&conf),
        path(&leases),
        path(&dir.path().join("dhcpd.pid")),
    );
    let _dhcpd = Daemon::start(
        &ns.server,
        &[
            DHCPD,
            "-4",
            "-f",
            "-d",
            "-cf",
            &conf,
            "-lf",
            &leases,
            "-pf",
            &pid,
            SERVER_VETH,
        ],
        dir.path().join("dhcpd.log"),
    );

    let ack = obtain_lease(&ns.client, LEASED_MAC);
    let leased = ack.yiaddr;
    eprintln!(
        "dhcpd leased {leased} to {LEASED_MAC} for {:?} s",
        ack.lease_time
    );

    let (answer, reply) = Namespaces::within(&ns.client, || {
        lease_query_with_reply(
            CLIENT_IP,
            SERVER_IP,
            LEASED_MAC,
            None,
            3,
            Duration::from_secs(1),
        )
    })
    .unwrap();
    eprintln!("lease query for {LEASED_MAC}: {answer:?} / {reply:?}");
    match answer {
        LeaseQueryAnswer::Active {
            ip,
            lease_remaining_s,
            server,
        } => {
            assert_eq!(ip, leased);
            let left = lease_remaining_s.expect("a finite lease");
            assert!(left > 0 && left <= 3600, "remaining lease {left}");
            assert_eq!(server, SERVER_IP);
        }
        other => panic!("dhcpd should know {LEASED_MAC}'s lease: {other:?}"),
    }
    // The answer, delivered toward the VM's port, installs its binding.
    let mut table = BindingTable::new(16);
    let now = Instant::now();
    match table.observe_server(1, 7, &reply.unwrap(), now) {
        Snooped::Installed(b) => assert_eq!((b.mac, b.ip, b.port), (LEASED_MAC, leased, 7)),
        other => panic!("{other:?}"),
    }
    assert!(table.permits(1, 7, LEASED_MAC, leased, now));

    let unknown = Namespaces::within(&ns.client, || {
        lease_query(
            CLIENT_IP,
            SERVER_IP,
            UNKNOWN_MAC,
            None,
            3,
            Duration::from_secs(1),
        )
    })
    .unwrap();
    eprintln!("lease query for {UNKNOWN_MAC}: {unknown:?}");
    assert_eq!(unknown, LeaseQueryAnswer::Unknown);

    // dhcpd answers lease queries only to a relay: without giaddr it
    // drops the query.
    let unrelayed = Namespaces::within(&ns.client, || {
        lease_query(
            Ipv4Addr::UNSPECIFIED,
            SERVER_IP,
            LEASED_MAC,
            None,
            1,
            Duration::from_millis(700),
        )
    })
    .unwrap();
    assert_eq!(unrelayed, LeaseQueryAnswer::NoAnswer);
}

#[test]
fn dnsmasq_acks_an_assisted_renewal_and_ignores_lease_queries() {
    if let Some(why) = skip_reason(DNSMASQ) {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Namespaces::new("dnsm");
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (leases, pid) = (file("dnsmasq.leases"), file("dnsmasq.pid"));
    let _dnsmasq = Daemon::start(
        &ns.server,
        &[
            DNSMASQ,
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
            "--user=root",
            &format!("--interface={SERVER_VETH}"),
            "--bind-interfaces",
            "--dhcp-range=10.45.0.100,10.45.0.150,1h",
            &format!("--dhcp-leasefile={leases}"),
            "--dhcp-authoritative",
            "--no-ping",
            "--log-dhcp",
            &format!("--pid-file={pid}"),
        ],
        dir.path().join("dnsmasq.log"),
    );

    let leased = obtain_lease(&ns.client, LEASED_MAC).yiaddr;
    eprintln!("dnsmasq leased {leased} to {LEASED_MAC}");

    let answer = Namespaces::within(&ns.client, || {
        lease_query(
            CLIENT_IP,
            SERVER_IP,
            LEASED_MAC,
            None,
            2,
            Duration::from_millis(700),
        )
    })
    .unwrap();
    assert_eq!(
        answer,
        LeaseQueryAnswer::NoAnswer,
        "dnsmasq has no lease query"
    );

    // The VM's address on the client side, so the server's unicast ACK to
    // it arrives (the client namespace plays the VM).
    run(&[
        "ip",
        "-n",
        &ns.client,
        "addr",
        "add",
        &format!("{leased}/32"),
        "dev",
        CLIENT_VETH,
    ]);
    let ack = Namespaces::within(&ns.client, move || {
        let vm = UdpSocket::bind(SocketAddrV4::new(leased, CLIENT_PORT)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        for _ in 0..5 {
            if Instant::now() >= deadline {
                break;
            }
            let xid = assisted_renew(CLIENT_IP, SERVER_IP, LEASED_MAC, leased, None).unwrap();
            if let Some(ack) = await_reply(&vm, xid, MessageType::Ack, Duration::from_secs(1)) {
                return Some(ack);
            }
        }
        None
    })
    .expect("dnsmasq's ACK to the assisted renewal");
    eprintln!("dnsmasq's ACK: {ack:?}");
    assert_eq!(ack.message_type, Some(MessageType::Ack));
    assert_eq!(ack.chaddr, LEASED_MAC);
    assert_eq!(ack.yiaddr, leased);
    assert!(
        ack.ciaddr == leased || ack.ciaddr.is_unspecified(),
        "ciaddr {}",
        ack.ciaddr
    );
    let lease = ack.lease_time.expect("a lease time");
    assert!(lease > 0 && lease <= 3600, "lease {lease}");

    // Snooping that ACK on its way to the VM's port binds the VM.
    let mut table = BindingTable::new(16);
    let now = Instant::now();
    assert!(matches!(
        table.observe_server(1, 3, &ack, now),
        Snooped::Installed(_)
    ));
    assert!(table.permits(1, 3, LEASED_MAC, leased, now));
}
