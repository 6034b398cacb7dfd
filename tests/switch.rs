//! The vhost-user switch end to end: three real guests on one host's
//! switch, two uplinks (veths) to other namespaces, a host port (tap),
//! VLAN isolation, learning and aging, shaping, invalid documents, and a
//! crashed QEMU not disturbing the other ports.
//!
//! Topology (every address lives in a namespace this test creates):
//!
//! ```text
//!  ns H (tandemd)                             ns X
//!  g1 10.10.0.1  vlan 10 (shaped) ─┐   up: access 10, up0 ── p0 10.10.0.100
//!  g2 10.10.0.2  vlan 10 ──────────┤
//!  g3 10.10.0.3  vlan 20 ──────────┤   trunk: 10+20, up1 ── q0 (ns T, tcpdump)
//!  tap tdmg0 10.10.0.50 vlan 10 ───┤
//!  tap tdmg1 vlan 20 ──────────────┘ (moved to ns Y: 10.10.0.200)
//! ```
//!
//! g3 shares the subnet with g1/g2 but sits on VLAN 20, so only VLAN
//! isolation keeps them apart. This kernel has no 802.1Q devices, so the
//! trunk is checked on the wire: tcpdump in T must see g1's frames tagged
//! 10 and g3's tagged 20.

use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::{image_dir, request, serial_guard, Daemon, Netns, READY};

const BOOT: Duration = Duration::from_secs(90);

fn spec(d: &Daemon, name: &str, ip: &str, mac: &str, group: &str) -> String {
    let img = image_dir();
    let disk = d.dir.path().join(format!("{name}-data.qcow2"));
    std::fs::copy(img.join("data.qcow2"), &disk).expect("copy data disk");
    format!(
        r#"name = "{name}"
memory_mib = 128
accelerator = "tcg"
shutdown_timeout_s = 10

[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 loglevel=4 tandem.ip={ip}/24"

[[disks]]
name = "data"
path = "{disk}"

[[nics]]
name = "eth0"
mac = "{mac}"
backend = "switch"
port_group = "{group}"
"#,
        kernel = img.join("vmlinux").display(),
        initrd = img.join("initrd.img").display(),
        disk = disk.display(),
    )
}

fn create(d: &Daemon, name: &str, ip: &str, mac: &str, group: &str) {
    let path = d.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, spec(d, name, ip, mac, group)).expect("write spec");
    d.cli_ok(&["vm", "create", path.to_str().expect("utf8"), "--start"]);
}

const DOC: &str = r#"
[switch]
mac_aging_s = 3

[[port_group]]
name = "v10"
vlan = 10

[[port_group]]
name = "v10-shaped"
vlan = 10
shaping_in = { average_kbps = 10000, peak_kbps = 20000, burst_bytes = 262144 }

[[port_group]]
name = "v20"
vlan = 20

[[port_group]]
name = "trunk"
vlan_mode = "trunk"
allowed_vlans = [10, 20]

[[uplink]]
name = "up"
interfaces = ["up0"]
port_group = "v10"

[[uplink]]
name = "trunk"
interfaces = ["up1"]
port_group = "trunk"

[[host_port]]
name = "mgmt"
tap = "tdmg0"
port_group = "v10"

[[host_port]]
name = "mgmt20"
tap = "tdmg1"
port_group = "v20"
"#;

/// One request from inside a namespace; `Err` text on failure.
fn ask(ns: &Netns, addr: &str, line: &str) -> Result<String, String> {
    let (addr, line) = (addr.to_string(), line.to_string());
    ns.within(move || request(&addr, &line, Duration::from_secs(3)).map_err(|e| e.to_string()))
}

/// Asks guest `via` (reached from `ns`) to DIAL another service.
fn dial(ns: &Netns, via: &str, to: &str, line: &str) -> String {
    ask(ns, &format!("{via}:7070"), &format!("DIAL {to} {line}"))
        .unwrap_or_else(|e| panic!("asking {via} to dial {to}: {e}"))
}

fn port<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["ports"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no port {name} in {stats}"))
}

fn counter(stats: &Value, name: &str, field: &str) -> u64 {
    port(stats, name)["counters"][field].as_u64().unwrap_or(0)
}

/// Bytes per second a guest pushes to a sink in `ns` for `ms`.
fn blast_rate(ns: &Netns, sink_ip: &str, port: u16, guest: &str, ms: u64) -> f64 {
    let bind = format!("{sink_ip}:{port}");
    let sink = {
        let bind = bind.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = ns.spawn(move || {
            let l = std::net::TcpListener::bind(&bind).expect("bind sink");
            tx.send(()).ok();
            let (mut c, _) = l.accept().expect("accept");
            c.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut buf = vec![0u8; 65536];
            let mut n = 0u64;
            let mut first: Option<Instant> = None;
            while let Ok(k) = c.read(&mut buf) {
                if k == 0 {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                n += k as u64;
            }
            (n, first.map_or(Duration::ZERO, |t| t.elapsed()))
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("sink ready");
        t
    };
    let (addr, line) = (format!("{guest}:7070"), format!("BLAST {bind} {ms}"));
    let reply = ns.within(move || {
        request(&addr, &line, Duration::from_millis(ms + 10_000)).map_err(|e| e.to_string())
    });
    // The guest's reply travels back while the sink drains; a shaped guest
    // may need a while for its last bytes.
    let reply = reply.unwrap_or_else(|e| panic!("BLAST from {guest}: {e}"));
    assert!(reply.starts_with("BLASTED"), "{guest}: {reply}");
    // Timed where the bytes arrive: the guest's clock, which times its
    // BLAST, runs unevenly under TCG.
    let (got, took) = sink.join().expect("sink");
    got as f64 / took.as_secs_f64().max(ms as f64 / 1000.0)
}

#[test]
fn switch_end_to_end() {
    let _g = serial_guard();
    let h = Netns::new("h");
    let x = Netns::new("x");
    let t = Netns::new("t");
    let y = Netns::new("y");
    for (ours, theirs, ns) in [("up0", "p0", &x), ("up1", "q0", &t)] {
        tandem_tests::sh(&format!(
            "ip link add {ours} netns {} type veth peer name {theirs} netns {}",
            h.name, ns.name
        ));
        h.run(&["ip", "link", "set", ours, "up"]);
        ns.run(&["ip", "link", "set", theirs, "up"]);
    }
    x.run(&["ip", "addr", "add", "10.10.0.100/24", "dev", "p0"]);

    let d = Daemon::start_in_netns(&h.name, &[]);

    // Invalid documents change nothing and name the field.
    let before = d.cli_ok(&["switch", "show"]);
    for (bad, field) in [
        (
            DOC.replace("port_group = \"trunk\"", "port_group = \"nope\""),
            "uplink[1].port_group",
        ),
        (
            DOC.replace("vlan = 20", "vlan = 4095"),
            "port_group[2].vlan",
        ),
        (
            DOC.replace("name = \"mgmt\"", "name = \"up\""),
            "host_port[0].name",
        ),
    ] {
        let path = d.dir.path().join("bad.toml");
        std::fs::write(&path, bad).unwrap();
        let out = d.cli(&["switch", "apply", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "an invalid document was applied");
        assert!(err.contains(field), "error does not name {field}: {err}");
        assert_eq!(
            d.cli_ok(&["switch", "show"]),
            before,
            "a bad document changed the switch"
        );
    }

    let path = d.dir.path().join("switch.toml");
    std::fs::write(&path, DOC).unwrap();
    d.cli_ok(&["switch", "apply", path.to_str().unwrap()]);
    h.run(&["ip", "addr", "add", "10.10.0.50/24", "dev", "tdmg0"]);
    // The VLAN 20 host port's tap moves to Y: its stack shares the subnet
    // with VLAN 10's and must not share a routing table with it.
    h.run(&["ip", "link", "set", "tdmg1", "netns", &y.name]);
    y.run(&["ip", "addr", "add", "10.10.0.200/24", "dev", "tdmg1"]);
    y.run(&["ip", "link", "set", "tdmg1", "up"]);

    create(&d, "g1", "10.10.0.1", "52:54:00:10:00:01", "v10-shaped");
    create(&d, "g2", "10.10.0.2", "52:54:00:10:00:02", "v10");
    create(&d, "g3", "10.10.0.3", "52:54:00:20:00:03", "v20");
    for g in ["g1", "g2", "g3"] {
        d.wait_console(g, READY, BOOT);
    }

    // Watch the trunk from the far side while the guests talk.
    let capture = d.dir.path().join("trunk.txt");
    let mut tcpdump = std::process::Command::new("ip")
        .args([
            "netns", "exec", &t.name, "tcpdump", "-l", "-e", "-nn", "-i", "q0",
        ])
        .stdout(std::fs::File::create(&capture).expect("capture file"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_secs(1));

    // A host in another namespace through the access uplink.
    assert_eq!(ask(&x, "10.10.0.1:7070", "PING").as_deref(), Ok("PONG"));
    assert_eq!(ask(&x, "10.10.0.2:7070", "PING").as_deref(), Ok("PONG"));
    // The host's own stack on the tap port.
    assert_eq!(ask(&h, "10.10.0.2:7070", "PING").as_deref(), Ok("PONG"));
    // Guest to guest in VLAN 10, both ways.
    assert_eq!(
        dial(&x, "10.10.0.1", "10.10.0.2:7070", "PING"),
        "DIALED PONG"
    );
    assert_eq!(
        dial(&x, "10.10.0.2", "10.10.0.1:7070", "PING"),
        "DIALED PONG"
    );
    // VLAN 20 has its own host port (in Y).
    assert_eq!(ask(&y, "10.10.0.3:7070", "PING").as_deref(), Ok("PONG"));
    // VLAN isolation: g3 (VLAN 20, same subnet) reaches no one in VLAN 10,
    // and no one in VLAN 10 reaches it.
    for to in ["10.10.0.1:7070", "10.10.0.2:7070", "10.10.0.100:7070"] {
        let r = dial(&y, "10.10.0.3", to, "PING");
        assert!(
            r.starts_with("DIALFAIL"),
            "g3 reached {to} across VLANs: {r}"
        );
    }
    assert!(
        ask(&x, "10.10.0.3:7070", "PING").is_err(),
        "X reached VLAN 20"
    );
    assert!(
        ask(&y, "10.10.0.1:7070", "PING").is_err(),
        "Y reached VLAN 10"
    );
    // Broadcasts from both VLANs to addresses nobody has: they can only
    // reach T through the trunk.
    let _ = dial(&x, "10.10.0.1", "10.10.0.77:7070", "PING");
    let _ = dial(&y, "10.10.0.3", "10.10.0.78:7070", "PING");
    std::thread::sleep(Duration::from_millis(500));
    let _ = tcpdump.kill();
    let _ = tcpdump.wait();
    let wire = std::fs::read_to_string(&capture).unwrap_or_default();
    let seen = |vlan: &str, who: &str| {
        wire.lines()
            .any(|l| l.contains(&format!("vlan {vlan},")) && l.contains(&format!("tell {who}")))
    };
    assert!(
        seen("10", "10.10.0.1"),
        "no VLAN 10 tag on the trunk from g1:\n{wire}"
    );
    assert!(
        seen("20", "10.10.0.3"),
        "no VLAN 20 tag on the trunk from g3:\n{wire}"
    );
    assert!(
        !seen("10", "10.10.0.3") && !seen("20", "10.10.0.1"),
        "wrong tags:\n{wire}"
    );

    // Learning: once X's address is learned on the uplink, g1's unicast
    // to it is not flooded to the host port (which, not being a VM port,
    // would receive every unknown unicast).
    let s0 = d.cli_json(&["switch", "stats"]);
    for i in 0..40 {
        assert_eq!(
            ask(&x, "10.10.0.1:7070", "PING").as_deref(),
            Ok("PONG"),
            "request {i}"
        );
    }
    let s1 = d.cli_json(&["switch", "stats"]);
    let g1_tx = counter(&s1, "g1.eth0", "rx_frames") - counter(&s0, "g1.eth0", "rx_frames");
    let mgmt = counter(&s1, "mgmt", "tx_frames") - counter(&s0, "mgmt", "tx_frames");
    assert!(g1_tx >= 120, "g1 sent only {g1_tx} frames");
    assert!(
        mgmt <= 6,
        "{mgmt} frames reached the host port while g1 sent {g1_tx} unicast frames to X"
    );
    // Aging: X's address is in the table now and gone a few seconds after
    // traffic stops (aging is 3 s in this document).
    let x_mac = x
        .run(&["ip", "-br", "link", "show", "p0"])
        .split_whitespace()
        .nth(2)
        .expect("p0's MAC")
        .to_string();
    let has_x = |s: &Value| {
        s["mac_table"].as_array().is_some_and(|t| {
            t.iter()
                .any(|e| e["mac"] == x_mac.as_str() && e["vlan"] == 10)
        })
    };
    assert!(
        has_x(&s1),
        "X's {x_mac} was not learned: {}",
        s1["mac_table"]
    );
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let s = d.cli_json(&["switch", "stats"]);
        if !has_x(&s) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{x_mac} did not age out: {}",
            s["mac_table"]
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Shaping: g1 is policed to 10 Mbit/s, g2 is not.
    let shaped = blast_rate(&x, "10.10.0.100", 7101, "10.10.0.1", 3000) * 8.0 / 1e6;
    let u0 = d.cli_json(&["switch", "stats"]);
    let free = blast_rate(&x, "10.10.0.100", 7102, "10.10.0.2", 3000) * 8.0 / 1e6;
    // g2's TSO segments leave through the uplink whole: the kernel behind
    // the packet socket segments them (or the veth carries them as GSO).
    let u1 = d.cli_json(&["switch", "stats"]);
    let up = |f: &str| counter(&u1, "up", f) - counter(&u0, "up", f);
    let (up_frames, up_bytes) = (up("tx_frames"), up("tx_bytes"));
    assert!(
        up_frames > 0 && up_bytes / up_frames > 4000,
        "uplink sent {up_frames} frames, {up_bytes} bytes: segmentation not left to the kernel"
    );
    assert_eq!(
        port(&u1, "up")["counters"]["drops"]["malformed"],
        0,
        "the uplink refused offloaded frames"
    );
    eprintln!("shaped guest {shaped:.1} Mbit/s, unshaped guest {free:.1} Mbit/s");
    // The policy allows 10 Mbit/s plus the 256 KiB burst (and one frame)
    // over the 3 s the guest is asked to send for; the guest's own clock
    // may run a little long under TCG.
    assert!(
        shaped <= 12.0,
        "the 10 Mbit/s policy let {shaped:.1} Mbit/s through"
    );
    // Shaped by back-pressure on its TX ring, the guest's TCP runs close
    // to the policy instead of collapsing under drops.
    assert!(
        shaped > 5.0,
        "the shaped guest got only {shaped:.2} Mbit/s through a 10 Mbit/s policy"
    );
    assert!(
        free > 3.0 * shaped,
        "unshaped {free:.1} Mbit/s is not much faster than shaped {shaped:.1}"
    );
    let s2 = d.cli_json(&["switch", "stats"]);
    assert_eq!(
        port(&s2, "g1.eth0")["counters"]["drops"]["shaped"],
        0,
        "a guest is shaped (made to wait), not policed"
    );

    // Offloads: g2's TCP segments reach g1 whole (both guests negotiated
    // checksum and segmentation offload), so the frames the switch writes
    // into g1 are far larger than any wire frame. g1 is policed on what it
    // sends, so its own 64 KiB segments are cut to wire frames first and
    // still get through.
    let s3 = d.cli_json(&["switch", "stats"]);
    let reply = ask(&x, "10.10.0.2:7070", "BLAST 10.10.0.1:7072 1500")
        .unwrap_or_else(|e| panic!("BLAST g2 -> g1: {e}"));
    assert!(reply.starts_with("BLASTED"), "g2 -> g1: {reply}");
    let s4 = d.cli_json(&["switch", "stats"]);
    let delta = |name: &str, field: &str| counter(&s4, name, field) - counter(&s3, name, field);
    let (frames, bytes) = (delta("g1.eth0", "tx_frames"), delta("g1.eth0", "tx_bytes"));
    assert!(frames > 0, "nothing reached g1");
    eprintln!("g2 -> g1: {frames} frames, {bytes} bytes, {reply}");
    assert!(
        bytes / frames > 4000,
        "g1 got {frames} frames averaging {} bytes: segmentation offload not used",
        bytes / frames
    );
    let drops = &port(&s4, "g2.eth0")["counters"]["drops"];
    assert_eq!(
        drops["malformed"], 0,
        "g2's offloaded frames refused: {drops}"
    );
    let reply = ask(&x, "10.10.0.1:7070", "BLAST 10.10.0.2:7072 1500")
        .unwrap_or_else(|e| panic!("BLAST g1 -> g2: {e}"));
    let sent: u64 = reply
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        sent > 50_000,
        "the policed guest got almost nothing to g2: {reply}"
    );

    // A QEMU that crashes leaves the other ports served, and a restarted
    // guest gets its port back.
    let pid = d.info("g2")["pid"].as_u64().expect("g2 pid") as i32;
    // SAFETY: kill(2) of the QEMU this test's tandemd started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    d.wait_info("g2", Duration::from_secs(15), |v| v["state"] == "crashed")
        .expect("g2 recorded as crashed");
    assert_eq!(ask(&x, "10.10.0.1:7070", "PING").as_deref(), Ok("PONG"));
    assert_eq!(ask(&h, "10.10.0.1:7070", "PING").as_deref(), Ok("PONG"));
    d.cli_ok(&["vm", "start", "g2"]);
    let deadline = Instant::now() + BOOT;
    loop {
        let r = dial(&x, "10.10.0.1", "10.10.0.2:7070", "PING");
        if r == "DIALED PONG" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "g1 cannot reach the restarted g2: {r}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
