//! The network follows the VM (seed 003): a guest that takes its address
//! from a real ISC dhcpd and joins a multicast group migrates across four
//! hosts, and each destination's switch rebuilds (or, for the negative
//! control, does not rebuild) its DHCP binding and group membership.
//!
//! ```text
//!   ns F: br0 10.40.0.1/24 — ISC dhcpd (allow leasequery), multicast sender
//!         br1 (migration links, 10.41.0.0/24)
//!   ns A, B, C, D: tandemd; uplink up0 ── br0; host port tdmh0 10.40.0.1N;
//!                 m0 10.41.0.N ── br1
//!   port group v: dhcp_snooping, ip_source_guard, igmp_snooping
//!
//!   A ──(aborted)──▶ E;  A ──(handover)──▶ B ──(no handover: lease query)──▶ C ──(flag forced to 0)──▶ D
//! ```
//!
//! A → E fails after A stopped the guest (E's QEMU cannot load the NIC's
//! device state): the frames that arrived meanwhile reach the guest on A,
//! none lost and in order, and E keeps no association.
//!
//! A → B: the binding and the group come with the VM; B's switch queries
//! the VM's port once; A forgets both. B → C: C drops the handover (fault
//! hook), so its switch asks dhcpd by RFC 4388 lease query. C → D: D
//! associates the VM as a new one (fault hook): no lease query, no IGMP
//! query, no binding, and with IP source guard on the guest is cut off —
//! what every switch without the migrated flag does until the lease's T1.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::fabric::wait_for;
use tandem_tests::{serial_guard, Daemon, Netns, READY};

const BOOT: Duration = Duration::from_secs(120);
const GUEST_MAC: &str = "52:54:00:99:00:02";
const GROUP: &str = "239.1.2.3";
const GROUP_PORT: u16 = 5000;
/// The second guest's static address and MAC (it never asks DHCP).
const STATIC_IP: &str = "10.40.0.200";
const STATIC_MAC: &str = "52:54:00:99:00:03";

/// ISC dhcpd in the fabric's namespace, killed on drop.
struct Dhcpd {
    child: Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Dhcpd {
    fn start(ns: &Netns) -> Dhcpd {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("dhcpd.conf");
        let leases = dir.path().join("dhcpd.leases");
        let log = dir.path().join("dhcpd.log");
        std::fs::write(
            &conf,
            "authoritative;\nallow leasequery;\ndefault-lease-time 3600;\nmax-lease-time 3600;\n\
             subnet 10.40.0.0 netmask 255.255.255.0 {\n  range 10.40.0.100 10.40.0.150;\n}\n",
        )
        .unwrap();
        std::fs::write(&leases, "").unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "/usr/sbin/dhcpd",
                "-4",
                "-f",
                "-d",
            ])
            .arg("-cf")
            .arg(&conf)
            .arg("-lf")
            .arg(&leases)
            .arg("-pf")
            .arg(dir.path().join("dhcpd.pid"))
            .arg("br0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("start dhcpd");
        let d = Dhcpd {
            child,
            log,
            _dir: dir,
        };
        wait_for("dhcpd listening", Duration::from_secs(10), || {
            d.log().contains("Sending on").then_some(())
        });
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lease queries dhcpd received from `from`.
    fn lease_queries_from(&self, from: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("DHCPLEASEQUERY") && l.contains(from))
            .count()
    }
}

impl Drop for Dhcpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A numbered multicast stream from the fabric, until dropped.
struct Sender {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sender {
    fn start(ns: &Netns) -> Sender {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = ns.spawn(move || {
            let sock = std::net::UdpSocket::bind(("10.40.0.1", 0)).expect("sender socket");
            sock.set_multicast_ttl_v4(1).unwrap();
            let to = (GROUP.parse::<Ipv4Addr>().unwrap(), GROUP_PORT);
            // Bounded: 20 per second for at most 10 minutes.
            for seq in 1..=12_000u64 {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let _ = sock.send_to(format!("{seq}\n").as_bytes(), to);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sender {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Host {
    // Field order is drop order: the daemon before its namespace.
    d: Daemon,
    _ns: Netns,
    /// This host's own address on the fabric (its host port's).
    ip: String,
    /// Its migration-link address.
    link: String,
}

fn host(fabric: &Netns, tag: &str, n: u8, extra: &[&str]) -> Host {
    let ns = Netns::new(tag);
    for (br, peer, inner) in [
        ("br0", format!("v{tag}"), "up0"),
        ("br1", format!("m{tag}"), "m0"),
    ] {
        tandem_tests::sh(&format!(
            "ip -n {f} link add {peer} type veth peer name {inner} netns {h}",
            f = fabric.name,
            h = ns.name
        ));
        fabric.run(&["ip", "link", "set", &peer, "master", br, "up"]);
        ns.run(&["ip", "link", "set", inner, "up"]);
    }
    let link = format!("10.41.0.{n}");
    ns.run(&["ip", "addr", "add", &format!("{link}/24"), "dev", "m0"]);
    let ip = format!("10.40.0.1{n}");
    let d = Daemon::start_in_netns(&ns.name, extra);
    let doc = format!(
        r#"[[port_group]]
name = "v"
dhcp_snooping = true
ip_source_guard = true
igmp_snooping = true
dhcp_servers = ["10.40.0.1"]

[[port_group]]
name = "s"
dhcp_snooping = true
dhcp_servers = ["10.40.0.1"]

[[uplink]]
name = "up"
interfaces = ["up0"]
port_group = "v"

[[host_port]]
name = "h"
tap = "tdmh0"
port_group = "v"
addresses = ["{ip}/24"]
"#
    );
    let path = d.dir.path().join("switch.toml");
    std::fs::write(&path, doc).unwrap();
    d.cli_ok(&["switch", "apply", path.to_str().unwrap()]);
    Host {
        d,
        _ns: ns,
        ip,
        link,
    }
}

fn snooping(h: &Host) -> Value {
    h.d.cli_json(&["switch", "stats"])["snooping"].clone()
}

fn counter(h: &Host, name: &str) -> u64 {
    snooping(h)["counters"][name].as_u64().unwrap_or(0)
}

/// The guest's binding on `h`'s switch, if any.
fn binding(h: &Host) -> Option<Value> {
    snooping(h)["bindings"]
        .as_array()?
        .iter()
        .find(|b| b["mac"] == GUEST_MAC)
        .cloned()
}

/// Whether `h`'s switch has the guest's VM port in the group.
fn vm_port_in_group(h: &Host) -> bool {
    let stats = h.d.cli_json(&["switch", "stats"]);
    let Some(port) = stats["ports"].as_array().and_then(|ps| {
        ps.iter()
            .find(|p| p["kind"].as_str().is_some_and(|k| k.starts_with("vm nf")))
            .and_then(|p| p["id"].as_u64())
    }) else {
        return false;
    };
    stats["snooping"]["groups"].as_array().is_some_and(|gs| {
        gs.iter().any(|g| {
            g["group"] == GROUP
                && g["ports"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p.as_u64() == Some(port)))
        })
    })
}

/// Every group member on `h` is an uplink: no VM port is left behind.
fn only_uplinks_in_groups(h: &Host) -> bool {
    let stats = h.d.cli_json(&["switch", "stats"]);
    let uplinks: Vec<u64> = stats["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"] == "uplink")
        .filter_map(|p| p["id"].as_u64())
        .collect();
    stats["snooping"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["ports"].as_array().into_iter().flatten())
        .all(|p| p.as_u64().is_some_and(|id| uplinks.contains(&id)))
}

fn ask(fabric: &Netns, guest: &str, line: &str) -> Result<String, String> {
    let (addr, line) = (format!("{guest}:7070"), line.to_string());
    fabric.within(move || {
        tandem_tests::request(&addr, &line, Duration::from_secs(3)).map_err(|e| e.to_string())
    })
}

/// Datagrams the guest has received on the group.
fn mstat(fabric: &Netns, guest: &str) -> Option<u64> {
    let r = ask(fabric, guest, "MSTAT").ok()?;
    r.split_whitespace().nth(1)?.parse().ok()
}

/// `MSTAT`'s four numbers: datagrams, highest number, numbers skipped,
/// datagrams out of order.
fn mstat_full(fabric: &Netns, guest: &str) -> Option<(u64, u64, u64, u64)> {
    let r = ask(fabric, guest, "MSTAT").ok()?;
    let n: Vec<u64> = r
        .split_whitespace()
        .skip(1)
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    match n[..] {
        [a, b, c, d] => Some((a, b, c, d)),
        _ => None,
    }
}

/// A QEMU whose virtio-net offers no checksum offload: the device state
/// of a guest that negotiated it does not load there ("Features …
/// unsupported"), which fails a migration after the source stopped.
struct NarrowQemu(tempfile::TempDir);

impl NarrowQemu {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu-narrow");
        std::fs::write(
            &path,
            "#!/bin/sh\nexec qemu-system-x86_64 \"$@\" -global virtio-net-pci.csum=off\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        NarrowQemu(dir)
    }
    fn path(&self) -> String {
        self.0.path().join("qemu-narrow").display().to_string()
    }
}

/// A migration that must fail once the stream completed: the source
/// resumes the guest.
fn migrate_aborts(from: &Host, to: &Host) {
    let out = from.d.cli(&[
        "migrate",
        "nf",
        "--to-socket",
        to.d.socket.to_str().unwrap(),
        "--listen",
        &format!("{}:0", to.link),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the source resumed it"),
        "{err}"
    );
    assert_eq!(from.d.info("nf")["qmp_status"], "running");
}

fn migrate(from: &Host, to: &Host) {
    migrate_vm(from, to, "nf")
}

fn migrate_vm(from: &Host, to: &Host, vm: &str) {
    let out = from.d.cli_ok(&[
        "--json",
        "migrate",
        vm,
        "--to-socket",
        to.d.socket.to_str().unwrap(),
        "--listen",
        &format!("{}:0", to.link),
    ]);
    let report: Value = serde_json::from_str(out.lines().last().expect("a report")).unwrap();
    assert_eq!(report["phase"], "done", "{report:#}");
}

#[test]
fn dhcp_bindings_and_multicast_groups_follow_a_migrating_guest() {
    let _g = serial_guard();
    if !std::path::Path::new("/usr/sbin/dhcpd").exists() {
        panic!("ISC dhcpd is missing: run ci/setup-host.sh (package isc-dhcp-server)");
    }
    let fabric = Netns::new("nff");
    for br in ["br0", "br1"] {
        fabric.run(&["ip", "link", "add", br, "type", "bridge"]);
        // The fabric is a plain wire: its own IGMP snooping would hide
        // what the tandem switches decide.
        fabric.run(&[
            "ip",
            "link",
            "set",
            br,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        fabric.run(&["ip", "link", "set", br, "up"]);
    }
    fabric.run(&["ip", "addr", "add", "10.40.0.1/24", "dev", "br0"]);
    fabric.run(&["ip", "route", "add", "224.0.0.0/4", "dev", "br0"]);
    let dhcpd = Dhcpd::start(&fabric);
    let a = host(&fabric, "nfa", 1, &[]);
    let b = host(&fabric, "nfb", 2, &[]);
    let c = host(&fabric, "nfc", 3, &["--fault-association", "no-handover"]);
    let d = host(&fabric, "nfd", 4, &["--fault-association", "new"]);
    let narrow = NarrowQemu::new();
    let e = host(&fabric, "nfe", 5, &["--qemu", &narrow.path()]);

    // The guest takes its address from dhcpd; A's switch snoops the ACK.
    let spec =
        a.d.guest_spec("nf", "")
            .replace("tandem.ip=10.99.0.2/24", "tandem.ip=dhcp")
            .replace(
                "backend = \"user\"",
                "backend = \"switch\"\nport_group = \"v\"",
            );
    let path = a.d.dir.path().join("nf.toml");
    std::fs::write(&path, spec).unwrap();
    a.d.cli_ok(&["vm", "create", path.to_str().unwrap(), "--start"]);
    // A second guest with a static address and no lease anywhere (M-6),
    // in a port group that snoops DHCP without a source guard.
    let spec =
        a.d.guest_spec("st", "")
            .replace(
                "tandem.ip=10.99.0.2/24",
                &format!("tandem.ip={STATIC_IP}/24"),
            )
            .replace(GUEST_MAC, STATIC_MAC)
            .replace(
                "backend = \"user\"",
                "backend = \"switch\"\nport_group = \"s\"",
            );
    let path = a.d.dir.path().join("st.toml");
    std::fs::write(&path, spec).unwrap();
    a.d.cli_ok(&["vm", "create", path.to_str().unwrap(), "--start"]);
    a.d.wait_console("nf", READY, BOOT);
    let bound = wait_for(
        "A's switch learns the guest's binding",
        Duration::from_secs(15),
        || binding(&a),
    );
    let guest = bound["ip"].as_str().unwrap().to_string();
    let lease = bound["lease_remaining_s"].as_u64().unwrap();
    assert!((3500..=3600).contains(&lease), "{bound}");
    assert!(a.d.console("nf").contains(&format!("dhcp bound {guest}")));
    // A new VM: nothing was rebuilt for it.
    assert_eq!(counter(&a, "triggered_queries"), 0);
    assert_eq!(counter(&a, "lease_refreshes_asked"), 0);
    assert_eq!(dhcpd.lease_queries_from(&a.ip), 0);

    // With source guard on, the bound guest is reachable.
    assert_eq!(ask(&fabric, &guest, "PING").as_deref(), Ok("PONG"));
    assert_eq!(
        ask(&fabric, &guest, &format!("MJOIN {GROUP} {GROUP_PORT}")).as_deref(),
        Ok(format!("MJOINED {GROUP} {GROUP_PORT}").as_str())
    );
    let _sender = Sender::start(&fabric);
    wait_for(
        "A's switch records the guest's membership",
        Duration::from_secs(15),
        || vm_port_in_group(&a).then_some(()),
    );
    wait_for(
        "the stream reaches the guest on A",
        Duration::from_secs(15),
        || mstat(&fabric, &guest).filter(|&n| n >= 5),
    );

    // A → E aborts after A stopped the guest: E's QEMU cannot load the
    // NIC's device state (it offers fewer virtio-net features than the
    // guest negotiated). The frames that arrived meanwhile wait on A and
    // reach the guest in order once it runs again; E keeps nothing.
    let (_, _, missing0, disordered0) = mstat_full(&fabric, &guest).expect("MSTAT");
    let delivered0 = counter(&a, "switchover_delivered");
    migrate_aborts(&a, &e);
    let before = mstat(&fabric, &guest).unwrap_or(0);
    wait_for(
        "the stream reaches the guest on A again",
        Duration::from_secs(15),
        || mstat(&fabric, &guest).filter(|&n| n >= before + 10),
    );
    let (_, _, missing1, disordered1) = mstat_full(&fabric, &guest).expect("MSTAT");
    let sa = snooping(&a);
    assert!(
        counter(&a, "switchover_delivered") > delivered0,
        "no frame was held for the guest while it was stopped: {sa}"
    );
    assert_eq!(
        (missing1 - missing0, disordered1 - disordered0),
        (0, 0),
        "frames lost or reordered across the aborted switchover: {sa}"
    );
    eprintln!(
        "aborted switchover: {} frames held and delivered on A, missing {missing1}, disordered {disordered1}",
        counter(&a, "switchover_delivered") - delivered0
    );
    let se = snooping(&e);
    assert!(
        se["associations"].as_array().is_some_and(|a| a.is_empty()),
        "the aborted destination kept an association: {se}"
    );
    assert!(
        se["bindings"].as_array().is_some_and(|b| b.is_empty()),
        "{se}"
    );
    assert!(
        !e.d.cli(&["vm", "info", "nf"]).status.success(),
        "the aborted destination kept the VM"
    );
    assert_eq!(ask(&fabric, &guest, "PING").as_deref(), Ok("PONG"));

    // A → B: the binding and the group come with the VM.
    let lease_a = binding(&a).unwrap()["lease_remaining_s"].as_u64().unwrap();
    let t = Instant::now();
    migrate(&a, &b);
    let on_b = wait_for(
        "B installs the handed-over binding",
        Duration::from_secs(5),
        || binding(&b),
    );
    assert_eq!(on_b["ip"], guest.as_str(), "{on_b}");
    let expect = lease_a.saturating_sub(t.elapsed().as_secs());
    let got = on_b["lease_remaining_s"].as_u64().unwrap();
    assert!(
        got.abs_diff(expect) <= 3,
        "B's lease {got} s, A had {lease_a} s {} s ago",
        t.elapsed().as_secs()
    );
    assert!(vm_port_in_group(&b), "{}", snooping(&b));
    assert_eq!(counter(&b, "bindings_handed_over"), 1);
    assert_eq!(counter(&b, "triggered_queries"), 1, "{}", snooping(&b));
    assert_eq!(counter(&b, "lease_refreshes_asked"), 0);
    assert_eq!(dhcpd.lease_queries_from(&b.ip), 0);
    // The stream goes on on B; the guest answers through B's guard.
    let before = mstat(&fabric, &guest).unwrap_or(0);
    wait_for(
        "the stream reaches the guest on B",
        Duration::from_secs(15),
        || mstat(&fabric, &guest).filter(|&n| n >= before + 10),
    );
    assert_eq!(ask(&fabric, &guest, "PING").as_deref(), Ok("PONG"));
    // M-5: the source forgot the departed port.
    let sa = snooping(&a);
    assert!(binding(&a).is_none(), "{sa}");
    // Only the uplink may still be a member: B's guest reports through it.
    assert!(only_uplinks_in_groups(&a), "{sa}");
    assert!(
        sa["counters"]["de_associations"].as_u64() >= Some(1),
        "{sa}"
    );

    // B → C, whose tandemd drops the handover: C's switch asks dhcpd.
    migrate(&b, &c);
    let on_c = wait_for(
        "C's lease query installs the binding",
        Duration::from_secs(15),
        || binding(&c),
    );
    assert_eq!(on_c["ip"], guest.as_str(), "{on_c}");
    assert_eq!(on_c["server"], "10.40.0.1", "{on_c}");
    let lease_c = on_c["lease_remaining_s"].as_u64().unwrap();
    assert!((3000..=3600).contains(&lease_c), "{on_c}");
    assert_eq!(counter(&c, "lease_refreshes_asked"), 1);
    assert_eq!(counter(&c, "bindings_from_lease_query"), 1);
    assert_eq!(counter(&c, "bindings_handed_over"), 0);
    assert_eq!(dhcpd.lease_queries_from(&c.ip), 1, "{}", dhcpd.log());
    // The triggered query made the guest report its group again.
    wait_for(
        "C learns the group from the guest's report",
        Duration::from_secs(10),
        || vm_port_in_group(&c).then_some(()),
    );
    assert_eq!(counter(&c, "triggered_queries"), 1);
    assert_eq!(ask(&fabric, &guest, "PING").as_deref(), Ok("PONG"));

    // C → D, whose tandemd associates the VM as a new one: nothing is
    // rebuilt. Counts over a window far longer than the positive cases
    // took (each above was done within a second or two).
    migrate(&c, &d);
    wait_for("D runs the guest", Duration::from_secs(10), || {
        (d.d.info("nf")["qmp_status"] == "running").then_some(())
    });
    let window = Instant::now() + Duration::from_secs(8);
    let mut pings_ok = 0;
    while Instant::now() < window {
        if ask(&fabric, &guest, "PING").is_ok() {
            pings_ok += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let sd = snooping(&d);
    assert_eq!(pings_ok, 0, "the guard let an unbound guest through: {sd}");
    assert!(binding(&d).is_none(), "{sd}");
    assert!(!vm_port_in_group(&d), "{sd}");
    assert_eq!(sd["counters"]["triggered_queries"], 0, "{sd}");
    assert_eq!(sd["counters"]["lease_refreshes_asked"], 0, "{sd}");
    assert_eq!(dhcpd.lease_queries_from(&d.ip), 0, "{}", dhcpd.log());
    assert!(
        sd["counters"]["source_guard_dropped"].as_u64() > Some(0),
        "the guest's replies were not what the guard stopped: {sd}"
    );

    // M-6: the static-address guest migrates A → C without a handover.
    // dhcpd knows no lease for it (DHCPLEASEUNKNOWN); C installs no
    // binding, says why, and the port group's policy (no guard) leaves the
    // guest reachable.
    a.d.wait_console("st", READY, BOOT);
    assert_eq!(ask(&fabric, STATIC_IP, "PING").as_deref(), Ok("PONG"));
    migrate_vm(&a, &c, "st");
    let unknown = wait_for(
        "C reports the static guest's lease unknown",
        Duration::from_secs(15),
        || {
            let sc = snooping(&c);
            sc["log"]
                .as_array()?
                .iter()
                .find(|e| {
                    e["port"] == "st.eth0"
                        && e["event"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("lease unknown"))
                })
                .cloned()
        },
    );
    eprintln!("static guest on C: {unknown}");
    let sc = snooping(&c);
    assert_eq!(counter(&c, "leases_unknown"), 1, "{sc}");
    assert!(
        !sc["bindings"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["mac"] == STATIC_MAC)),
        "{sc}"
    );
    assert_eq!(dhcpd.lease_queries_from(&c.ip), 2, "{}", dhcpd.log());
    assert_eq!(
        dhcpd
            .log()
            .lines()
            .filter(|l| l.contains("DHCPLEASEUNKNOWN"))
            .count(),
        1,
        "{}",
        dhcpd.log()
    );
    assert_eq!(ask(&fabric, STATIC_IP, "PING").as_deref(), Ok("PONG"));
}
