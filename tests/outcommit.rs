//! Output commit in the switch, end to end: a protected guest on host A's
//! switch, a client in another namespace behind the switch's uplink, and
//! a backup tandemd committing epochs.
//!
//! ```text
//!  ns H: tandemd A (primary, switch)           ns X (client)
//!  guest 10.20.0.10 ── port group vms ── up0 ── x0 10.20.0.100
//!  tandemd B (backup, root ns) ◄── unix replication socket
//! ```
//!
//! - Replies of the record service (held) never reach the client before
//!   the epoch that produced them is committed, checked against the
//!   engine's own commit numbers; with the mode switched `off` they do.
//! - A UDP media stream that a rule passes arrives spread out as the guest
//!   sent it; held, it arrives in bursts at epoch commits. A rule added at
//!   runtime lets datagrams overtake older ones still held.

use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::{image_dir, request, serial_guard, Daemon, Netns, READY};

const BOOT: Duration = Duration::from_secs(90);
const GUEST: &str = "10.20.0.10";
const CLIENT: &str = "10.20.0.100";

const DOC: &str = r#"
[[port_group]]
name = "vms"
vlan = 10

[[uplink]]
name = "up"
interfaces = ["up0"]
port_group = "vms"
"#;

fn spec(d: &Daemon) -> String {
    let img = image_dir();
    let disk = d.dir.path().join("oc-data.qcow2");
    std::fs::copy(img.join("data.qcow2"), &disk).expect("copy data disk");
    format!(
        r#"name = "oc"
memory_mib = 128
accelerator = "tcg"
shutdown_timeout_s = 10

[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 loglevel=4 tandem.ip={GUEST}/24"

[[disks]]
name = "data"
path = "{disk}"

[[nics]]
name = "eth0"
mac = "52:54:00:20:00:10"
backend = "switch"
port_group = "vms"
"#,
        kernel = img.join("vmlinux").display(),
        initrd = img.join("initrd.img").display(),
        disk = disk.display(),
    )
}

fn primary(d: &Daemon) -> Value {
    let v = d.cli_json(&["ft", "status", "oc"]);
    v.as_array()
        .and_then(|a| a.iter().find(|s| s["role"] == "primary"))
        .cloned()
        .unwrap_or(Value::Null)
}

fn wait_protected(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = primary(d);
        if s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) >= 3 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not protected: {s:#}\n{}",
            tandem_tests::tail(&d.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// PUTs from the client; for each, the primary's open epoch before the
/// request and its last committed epoch after the reply arrived. Returns
/// how many replies arrived before their epoch could have committed.
fn early_replies(a: &Daemon, x: &Netns, n: usize) -> usize {
    let mut early = 0;
    for i in 0..n {
        let before = primary(a)["open_epoch"].as_u64().expect("open_epoch");
        let addr = format!("{GUEST}:7070");
        let line = format!("PUT oc-{i}");
        let reply = x
            .within(move || {
                request(&addr, &line, Duration::from_secs(10)).map_err(|e| e.to_string())
            })
            .unwrap_or_else(|e| {
                panic!(
                    "PUT {i}: {e}\nswitch: {}\nft: {:#}",
                    a.cli_ok(&["switch", "stats"]),
                    primary(a)
                )
            });
        let committed = primary(a)["last_committed"]
            .as_u64()
            .expect("last_committed");
        assert!(reply.starts_with("OK "), "{reply}");
        // The reply was produced in epoch `before` or later, so a held
        // reply cannot have been released before `before` committed.
        if committed < before {
            early += 1;
        }
    }
    early
}

/// Arrival times of a guest's `MEDIA` stream to the client.
fn media(x: &Netns, count: u32, every_ms: u64, during: impl FnOnce()) -> Vec<(u32, Instant)> {
    let bind = format!("{CLIENT}:6000");
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = x.spawn(move || {
        let s = std::net::UdpSocket::bind(&bind).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(3))).ok();
        tx.send(()).ok();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < count as usize {
            let Ok(n) = s.recv(&mut buf) else { break };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if let Some(seq) = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                got.push((seq, Instant::now()));
            }
        }
        got
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("sink ready");
    let (addr, line) = (
        format!("{GUEST}:7070"),
        format!("MEDIA {CLIENT}:6000 {count} {every_ms}"),
    );
    let asker =
        x.spawn(move || request(&addr, &line, Duration::from_secs(30)).map_err(|e| e.to_string()));
    during();
    let reply = asker.join().expect("asker");
    assert!(
        reply.as_deref().is_ok_and(|r| r.starts_with("MEDIAED")),
        "{reply:?}"
    );
    sink.join().expect("sink")
}

/// The share of datagrams that arrived within 1 ms of the previous one:
/// near 0 for a stream paced at several ms, near 1 for one released in
/// bursts at commits.
fn bunched(arrivals: &[(u32, Instant)]) -> f64 {
    if arrivals.len() < 2 {
        return 0.0;
    }
    let close = arrivals
        .windows(2)
        .filter(|w| w[1].1.duration_since(w[0].1) < Duration::from_millis(1))
        .count();
    close as f64 / (arrivals.len() - 1) as f64
}

#[test]
fn held_output_waits_for_commit_and_pass_output_does_not() {
    let _g = serial_guard();
    let h = Netns::new("och");
    let x = Netns::new("ocx");
    tandem_tests::sh(&format!(
        "ip link add up0 netns {} type veth peer name x0 netns {}",
        h.name, x.name
    ));
    h.run(&["ip", "link", "set", "up0", "up"]);
    x.run(&["ip", "link", "set", "x0", "up"]);
    x.run(&["ip", "addr", "add", &format!("{CLIENT}/24"), "dev", "x0"]);

    let link = tempfile::Builder::new()
        .prefix("tandem-oc-link-")
        .tempdir()
        .expect("tempdir");
    let endpoint = format!("unix:{}/repl.sock", link.path().display());
    let b = Daemon::start_with(&["--repl-listen", &endpoint]);
    let a = Daemon::start_in_netns(&h.name, &[]);
    let doc = a.dir.path().join("switch.toml");
    std::fs::write(&doc, DOC).expect("write doc");
    a.cli_ok(&["switch", "apply", doc.to_str().expect("utf8")]);
    let path = a.dir.path().join("oc.toml");
    std::fs::write(&path, spec(&a)).expect("spec");
    a.cli_ok(&["vm", "create", path.to_str().expect("utf8"), "--start"]);
    a.wait_console("oc", READY, BOOT);

    // Rules are validated before anything is protected.
    let bad = a.cli(&[
        "protect",
        "oc",
        "--backup",
        &endpoint,
        "--rule",
        "pass udp dport 9-1",
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("rule 1"), "{err}");
    assert!(
        !a.cli(&["ft", "status", "oc"]).status.success(),
        "a rejected protect left the VM protected"
    );

    a.cli_ok(&[
        "protect",
        "oc",
        "--backup",
        &endpoint,
        "--epoch-ms",
        "100",
        "--profile",
        "conservative",
    ]);
    wait_protected(&a);
    let _ = &b;

    // 1. Held replies are never early; with output commit off they are.
    assert_eq!(early_replies(&a, &x, 12), 0, "a held reply beat its commit");
    a.cli_ok(&["ft", "rules", "set", "oc", "--mode", "off"]);
    let early = early_replies(&a, &x, 12);
    assert!(
        early > 0,
        "with output commit off, no reply arrived before its commit"
    );
    a.cli_ok(&["ft", "rules", "set", "oc", "--mode", "classified"]);

    // 2. Held media arrives in bursts at commits; passed media as paced.
    let held = media(&x, 60, 5, || {});
    assert!(
        held.len() >= 55,
        "held stream lost datagrams: {}",
        held.len()
    );
    a.cli_ok(&[
        "ft",
        "rules",
        "add",
        "oc",
        "pass udp dport 6000",
        "--position",
        "1",
    ]);
    let table = a.cli_json(&["ft", "rules", "show", "oc"]);
    assert_eq!(table["rules"][0], "pass udp dport 6000", "{table:#}");
    let passed = media(&x, 60, 5, || {});
    assert!(
        passed.len() >= 55,
        "passed stream lost datagrams: {}",
        passed.len()
    );
    let (b_held, b_passed) = (bunched(&held), bunched(&passed));
    eprintln!("bunched: held {b_held:.2}, passed {b_passed:.2}");
    assert!(
        b_held > 0.6,
        "held media was not released in bursts ({b_held:.2})"
    );
    assert!(
        b_passed < b_held / 2.0,
        "passed media is quantised like held media ({b_passed:.2} vs {b_held:.2})"
    );

    // 3. A rule change applies to the very next frame: delete the pass
    // rule, then add it back in the middle of a held stream; datagrams
    // that pass overtake older ones still held.
    a.cli_ok(&["ft", "rules", "del", "oc", "1"]);
    let a_ref = &a;
    let mixed = media(&x, 200, 5, || {
        std::thread::sleep(Duration::from_millis(400));
        a_ref.cli_ok(&[
            "ft",
            "rules",
            "add",
            "oc",
            "pass udp dport 6000",
            "--position",
            "1",
        ]);
    });
    let overtaken = mixed.windows(2).filter(|w| w[1].0 < w[0].0).count();
    assert!(
        overtaken > 0,
        "no datagram passed while older ones were held: {:?}",
        mixed.iter().map(|m| m.0).collect::<Vec<_>>()
    );

    let st = primary(&a);
    let out = &st["output"];
    assert!(out["held_frames"].as_u64().unwrap_or(0) > 0, "{st:#}");
    assert!(out["passed_frames"].as_u64().unwrap_or(0) > 0, "{st:#}");
    assert!(out["released_frames"].as_u64().unwrap_or(0) > 0, "{st:#}");
    assert!(out["hold_p50_us"].as_u64().unwrap_or(0) > 0, "{st:#}");

    // 4. A full hold queue drops the newest held frame (the documented
    // policy) and loses nothing acknowledged: re-protect with room for
    // 4 frames, flood it with held media, and every PUT the client sees
    // answered is still known to the guest.
    a.cli_ok(&["unprotect", "oc"]);
    a.cli_ok(&[
        "protect",
        "oc",
        "--backup",
        &endpoint,
        "--epoch-ms",
        "100",
        "--profile",
        "conservative",
        "--hold-max-frames",
        "4",
    ]);
    wait_protected(&a);
    let flood = media(&x, 100, 1, || {});
    let st = primary(&a);
    let drops = st["output"]["overflow_drops"].as_u64().unwrap_or(0);
    assert!(drops > 0, "a 4-frame queue took 100 datagrams: {st:#}");
    assert!(
        flood.len() < 100,
        "every datagram arrived despite overflow drops"
    );
    for i in 0..5 {
        let (addr, line) = (format!("{GUEST}:7070"), format!("PUT overflow-{i}"));
        let reply = x
            .within(move || {
                request(&addr, &line, Duration::from_secs(20)).map_err(|e| e.to_string())
            })
            .unwrap_or_else(|e| panic!("PUT overflow-{i}: {e}"));
        let seq = reply.strip_prefix("OK ").expect("OK n").to_string();
        let (addr, line) = (format!("{GUEST}:7070"), format!("GET {seq}"));
        let got = x
            .within(move || {
                request(&addr, &line, Duration::from_secs(20)).map_err(|e| e.to_string())
            })
            .expect("GET");
        assert_eq!(got, format!("REC {seq} overflow-{i}"));
    }
    a.cli_ok(&["unprotect", "oc"]);
    a.cli_ok(&["vm", "destroy", "oc"]);
}
