//! Live migration between two tandemds on this machine (shared storage:
//! both see the guest's disk at the same path; copied with
//! `--copy-storage`): the guest moves and keeps counting; a cancelled
//! migration, one the convergence ladder aborts (a guest dirtying four
//! times faster than its tbf-shaped link) and a destination that cannot
//! listen leave the VM running on the source and nothing on the
//! destination; the same guest with postcopy allowed finishes on that
//! rung; a protected VM migrates with its protection.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_tests::{bin, serial_guard, ticks, Daemon, SmallFs, READY};

const BOOT: Duration = Duration::from_secs(90);

fn vm_names(d: &Daemon) -> Vec<String> {
    d.cli_json(&["vm", "list"])
        .as_array()
        .expect("vm list")
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect()
}

/// The destination holds nothing of the VM: no record, no QEMU.
fn assert_destination_clean(dst: &Daemon, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let names = vm_names(dst);
        let qemus = dst.qemu_processes();
        if names.is_empty() && qemus.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{why}: the destination kept VMs {names:?} and QEMUs {qemus:?}\n{}",
            dst.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_running_guest_migrates_and_keeps_counting() {
    let _g = serial_guard();
    let src = Daemon::start();
    let dst = Daemon::start();
    src.create_guest("mg", "");
    src.cli_ok(&["vm", "start", "mg"]);
    src.wait_console("mg", READY, BOOT);
    src.wait_console("mg", "tandem-guest: tick 3", BOOT);
    let uuid = src.info("mg")["uuid"].as_str().unwrap().to_string();
    let before = *ticks(&src.console("mg")).last().expect("ticks");

    let out = src.cli_ok(&[
        "--json",
        "migrate",
        "mg",
        "--to-socket",
        dst.socket.to_str().unwrap(),
    ]);
    // JSON lines: progress events, the final report last.
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let report = lines.last().expect("a final report").clone();
    assert!(lines.len() >= 2, "no progress events: {out}");
    let fractions: Vec<f64> = lines[..lines.len() - 1]
        .iter()
        .map(|e| e["fraction"].as_f64().expect("fraction"))
        .collect();
    assert!(
        fractions.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {fractions:?}"
    );
    assert_eq!(fractions.last(), Some(&1.0), "{out}");
    assert_eq!(report["phase"], "done", "{report:#}");
    assert!(report["transferred"].as_u64().unwrap() > 0, "{report:#}");

    // The source's copy is gone, QEMU and all.
    assert!(vm_names(&src).is_empty(), "{:?}", vm_names(&src));
    assert!(src.qemu_processes().is_empty());
    // The destination runs the same VM, resumed, not booted afresh.
    let info = dst.info("mg");
    assert_eq!(info["state"], "running", "{info:#}");
    assert_eq!(info["uuid"], uuid.as_str());
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(t) = ticks(&dst.console("mg")).first() {
            break *t;
        }
        assert!(Instant::now() < deadline, "the migrated guest never ticked");
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = dst.console("mg");
    assert!(
        !console.contains(READY),
        "the destination booted the guest afresh:\n{console}"
    );
    assert!(
        first > before,
        "the migrated counter starts at {first}, the source had reached {before}"
    );
    dst.wait_console(
        "mg",
        &format!("tandem-guest: tick {}", first + 3),
        Duration::from_secs(30),
    );
    // Its devices came over whole: the ACPI power button still works.
    let stopped = dst.cli_json(&["vm", "stop", "mg"]);
    assert_eq!(stopped["state"], "shutoff", "{stopped:#}");
    // Shared storage (the destination read the source's probe beside the
    // disk): the disk was used in place, and no probe is left behind.
    let spec = dst.info("mg")["spec_toml"].as_str().unwrap().to_string();
    let disk = src.dir.path().join("mg-data.qcow2");
    assert!(spec.contains(&disk.display().to_string()), "{spec}");
    let probes: Vec<_> = std::fs::read_dir(src.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("probe"))
        .map(|e| e.path())
        .collect();
    assert!(probes.is_empty(), "probes left behind: {probes:?}");
}

#[test]
fn failed_or_cancelled_migrations_leave_the_vm_on_the_source() {
    let _g = serial_guard();
    let src = Daemon::start();
    let dst = Daemon::start();
    src.create_guest("mc", "");
    src.cli_ok(&["vm", "start", "mc"]);
    src.wait_console("mc", READY, BOOT);

    // A destination that cannot listen (the port is taken): refused before
    // anything moves.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let out = src.cli(&[
        "migrate",
        "mc",
        "--to-socket",
        dst.socket.to_str().unwrap(),
        "--listen",
        &listen,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("preparing the destination"), "{err}");
    assert_destination_clean(&dst, "a destination that could not listen");
    assert_eq!(src.info("mc")["state"], "running");

    // Bad input: an unknown VM, a VM that is not running.
    let out = src.cli(&[
        "migrate",
        "nosuch",
        "--to-socket",
        dst.socket.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));

    // Cancel: at 1 MiB/s the migration is still sending when cancelled.
    let mut child = Command::new(bin("tandem"))
        .arg("--socket")
        .arg(&src.socket)
        .args(["migrate", "mc", "--bandwidth", "1", "--to-socket"])
        .arg(&dst.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = src.cli(&["migrate", "mc", "--cancel"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never became cancellable: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tandem migrate did not end after the cancel");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    assert!(!status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was cancelled"), "{err}");
    assert_destination_clean(&dst, "a cancelled migration");
    let info = src.info("mc");
    assert_eq!(info["state"], "running", "{info:#}");
    assert_eq!(info["qmp_status"], "running", "{info:#}");
    let t = *ticks(&src.console("mc")).last().unwrap_or(&0);
    src.wait_console(
        "mc",
        &format!("tandem-guest: tick {}", t + 2),
        Duration::from_secs(30),
    );

    // A restored VM runs from copies in the source's own directory for
    // it: never taken for shared storage, they are copied. A destination
    // without room for the copies refuses before anything is made there.
    src.cli_ok(&["vm", "checkpoint", "mc", "mc-ck"]);
    src.cli_ok(&["vm", "stop", "mc", "--force"]);
    let ck = src.state_dir.join("checkpoints").join("mc-ck");
    src.cli_ok(&["vm", "restore", "mc", ck.to_str().unwrap()]);
    let small = SmallFs::new("48m");
    let cramped = Daemon::start_in(Some(small.0.join("state")), &[]);
    let out = src.cli(&[
        "migrate",
        "mc",
        "--to-socket",
        cramped.socket.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no room for the disks' copies"),
        "{err}"
    );
    assert_destination_clean(&cramped, "a destination without room");
    let leftovers: Vec<_> = std::fs::read_dir(small.0.join("state/vms"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(src.info("mc")["qmp_status"], "running");
    drop(cramped);

    // (The checkpoint also left QEMU's x-ignore-shared on, which would
    // skip the guest's RAM: the migration's setup turns it off.)
    let t = *ticks(&src.console("mc")).last().unwrap_or(&0);
    let out = src.cli(&["migrate", "mc", "--to-socket", dst.socket.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", src.log());
    assert!(err.contains("copying disk data"), "{err}");
    assert!(vm_names(&src).is_empty());
    dst.wait_console(
        "mc",
        &format!("tandem-guest: tick {}", t + 2),
        Duration::from_secs(30),
    );
}

/// Two hosts in namespaces and a guest on A's switch that dirties its
/// memory four times faster than the migration link carries it: the
/// link A→B is shaped with `tc tbf` to 16 MiB/s, and a client on A's host
/// port rewrites the guest service's whole 32 MiB buffer every 500 ms
/// (64 MiB/s) until the returned flag is set. Each host has a host port
/// with the same address, so the guest answers on whichever runs it.
struct DirtyingGuest {
    // Field order is drop order: the client, the daemons (and their
    // QEMUs), then the namespaces.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    load: Option<std::thread::JoinHandle<u64>>,
    src: Daemon,
    dst: Daemon,
    a: tandem_tests::Netns,
    b: tandem_tests::Netns,
}

impl DirtyingGuest {
    fn start(tag: &str, vm: &str) -> DirtyingGuest {
        let a = tandem_tests::Netns::new(&format!("{tag}a"));
        let b = tandem_tests::Netns::new(&format!("{tag}b"));
        tandem_tests::sh(&format!(
            "ip link add m0 netns {} type veth peer name m1 netns {}",
            a.name, b.name
        ));
        a.run(&["ip", "addr", "add", "10.24.0.1/24", "dev", "m0"]);
        a.run(&["ip", "link", "set", "m0", "up"]);
        b.run(&["ip", "addr", "add", "10.24.0.2/24", "dev", "m1"]);
        b.run(&["ip", "link", "set", "m1", "up"]);
        // 16 MiB/s from A to B: the stream's direction.
        a.run(&[
            "tc",
            "qdisc",
            "add",
            "dev",
            "m0",
            "root",
            "tbf",
            "rate",
            "134217728bit",
            "burst",
            "262144",
            "latency",
            "50ms",
        ]);
        let src = Daemon::start_in_netns(&a.name, &[]);
        let dst = Daemon::start_in_netns(&b.name, &[]);
        let doc = "[[port_group]]\nname = \"v\"\n\n[[host_port]]\nname = \"h\"\ntap = \"tdmp0\"\nport_group = \"v\"\n";
        for (d, ns) in [(&src, &a), (&dst, &b)] {
            let path = d.dir.path().join("switch.toml");
            std::fs::write(&path, doc).unwrap();
            d.cli_ok(&["switch", "apply", path.to_str().unwrap()]);
            ns.run(&["ip", "addr", "add", "10.23.0.50/24", "dev", "tdmp0"]);
            ns.run(&["ip", "link", "set", "tdmp0", "up"]);
        }
        let spec = src
            .guest_spec(vm, "")
            .replace("tandem.ip=10.99.0.2/24", "tandem.ip=10.23.0.5/24")
            .replace(
                "backend = \"user\"",
                "backend = \"switch\"\nport_group = \"v\"",
            );
        let path = src.dir.path().join(format!("{vm}.toml"));
        std::fs::write(&path, spec).unwrap();
        src.cli_ok(&["vm", "create", path.to_str().unwrap(), "--start"]);
        src.wait_console(vm, READY, BOOT);
        assert_eq!(ping(&a).as_deref(), Ok("PONG"), "before the migration");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        // Bounded in time and count; requests fail once the guest has
        // moved (A's host port no longer reaches it).
        let load = a.spawn(move || {
            let started = Instant::now();
            let mut done = 0u64;
            while !flag.load(std::sync::atomic::Ordering::SeqCst)
                && started.elapsed() < Duration::from_secs(300)
                && done < 2000
            {
                let t = Instant::now();
                if tandem_tests::request("10.23.0.5:7070", "DIRTY 8192", Duration::from_secs(2))
                    .is_ok_and(|r| r == "DIRTIED 8192")
                {
                    done += 1;
                }
                std::thread::sleep(Duration::from_millis(500).saturating_sub(t.elapsed()));
            }
            done
        });
        DirtyingGuest {
            stop,
            load: Some(load),
            src,
            dst,
            a,
            b,
        }
    }

    /// Stops the load; how many 32 MiB rewrites the guest made.
    fn stop_load(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.load.take().map_or(0, |h| h.join().unwrap_or(0))
    }

    fn migrate(&self, vm: &str, extra: &[&str]) -> std::process::Output {
        let mut args = vec![
            "--json",
            "migrate",
            vm,
            "--to-socket",
            self.dst.socket.to_str().unwrap(),
            "--listen",
            "10.24.0.2:0",
            "--no-throttle",
            "--downtime-ms",
            "50",
            "--max-downtime-ms",
            "50",
            "--stall-s",
            "1",
        ];
        args.extend_from_slice(extra);
        self.src.cli(&args)
    }
}

impl Drop for DirtyingGuest {
    fn drop(&mut self) {
        self.stop_load();
    }
}

fn ping(ns: &tandem_tests::Netns) -> Result<String, String> {
    ns.within(|| {
        tandem_tests::request("10.23.0.5:7070", "PING", Duration::from_secs(3))
            .map_err(|e| e.to_string())
    })
}

/// Issue 18's non-converging guest, postcopy off: with the throttle rung
/// disabled and a 50 ms downtime bound, the ladder finds the stall and
/// aborts cleanly, naming the numbers; the guest runs on at the source
/// (still dirtying) and the destination holds nothing.
#[test]
fn a_guest_dirtying_faster_than_its_link_aborts_cleanly_without_postcopy() {
    let _g = serial_guard();
    let mut g = DirtyingGuest::start("na", "mn");
    let out = g.migrate("mn", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("was aborted") && err.contains("did not converge"),
        "{err}"
    );
    assert!(err.contains("allow postcopy"), "{err}");
    let report: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or(""),
    )
    .expect("a JSON report");
    assert_eq!(report["phase"], "aborted", "{report:#}");
    // It was the guest's own dirtying that kept it from converging: the
    // ladder's last reading of QEMU's dirty rate, in its message, is well
    // above an idle guest's (it reads 0.0 MiB/s in the same test setup).
    let message = report["message"].as_str().unwrap_or_default();
    let dirties: f64 = message
        .split("the guest dirties ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no dirty rate in {message}"));
    assert!(dirties > 1.0, "{message}");
    assert_destination_clean(&g.dst, "an aborted migration");
    assert_eq!(g.src.info("mn")["qmp_status"], "running");
    assert_eq!(ping(&g.a).as_deref(), Ok("PONG"), "after the abort");
    assert!(g.stop_load() > 0, "the load never ran");
}

/// Issue 18's non-converging guest, postcopy allowed. Postcopy with a NIC
/// on tandem's switch: QEMU accepts the capability only because the
/// switch offers vhost-user `PAGEFAULT` (userfaultfd on its own mapping
/// of guest RAM), and after the switch-over the guest, still pulling
/// pages from the source, is served through the destination's switch.
#[test]
fn a_guest_dirtying_faster_than_its_link_finishes_by_postcopy() {
    let _g = serial_guard();
    let mut g = DirtyingGuest::start("po", "mp");
    let before = *ticks(&g.src.console("mp")).last().unwrap_or(&0);
    let out = g.migrate("mp", &["--allow-postcopy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loads = g.stop_load();
    let report: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or(""),
    )
    .expect("a JSON report");
    assert_eq!(report["phase"], "done", "{report:#}");
    assert_eq!(report["rung"], "postcopy", "{report:#}");
    assert!(loads > 0, "the load never ran");
    assert!(vm_names(&g.src).is_empty());
    assert!(g.src.qemu_processes().is_empty());
    let info = g.dst.info("mp");
    assert_eq!(info["state"], "running", "{info:#}");
    assert_eq!(info["qmp_status"], "running", "{info:#}");
    g.dst.wait_console(
        "mp",
        &format!("tandem-guest: tick {}", before + 3),
        Duration::from_secs(60),
    );
    assert!(!g.dst.console("mp").contains(READY));
    // Served through the destination's switch (bounded retries: the
    // guest's announcement and the host port's neighbour entry).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ping(&g.b) {
            Ok(r) if r == "PONG" => break,
            other => assert!(
                Instant::now() < deadline,
                "the guest does not answer through the destination's switch: {other:?}\n{}",
                g.dst.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two hosts in namespaces with a standalone pair's identities (QEMU's
/// stream runs over TLS, each end checked against the pair's CA, the
/// destination by its name), each with a switch carrying port group `v`:
///
/// ```text
///  ns A: tandemd A, host port tap tdmh0 (10.20.0.50) ─ guest 10.20.0.5 (before)
///  ns B: tandemd B, uplink up0 ── c0 10.20.0.100 in ns C   (guest after)
///  A m0 LINK.1 ──── m1 LINK.2 B   (the migration stream)
/// ```
struct TlsPair {
    // Field order is drop order: the daemons before their namespaces.
    src: Daemon,
    dst: Daemon,
    a: tandem_tests::Netns,
    b: tandem_tests::Netns,
    c: tandem_tests::Netns,
    _certs: tempfile::TempDir,
}

/// [`TlsPair`], namespaces tagged `tag`, the stream's link on `link`
/// (the first three octets of a /24).
fn tls_pair(tag: &str, link: &str) -> TlsPair {
    let a = tandem_tests::Netns::new(&format!("{tag}a"));
    let b = tandem_tests::Netns::new(&format!("{tag}b"));
    let c = tandem_tests::Netns::new(&format!("{tag}c"));
    tandem_tests::sh(&format!(
        "ip link add m0 netns {} type veth peer name m1 netns {}",
        a.name, b.name
    ));
    tandem_tests::sh(&format!(
        "ip link add up0 netns {} type veth peer name c0 netns {}",
        b.name, c.name
    ));
    a.run(&["ip", "addr", "add", &format!("{link}.1/24"), "dev", "m0"]);
    a.run(&["ip", "link", "set", "m0", "up"]);
    b.run(&["ip", "addr", "add", &format!("{link}.2/24"), "dev", "m1"]);
    b.run(&["ip", "link", "set", "m1", "up"]);
    b.run(&["ip", "link", "set", "up0", "up"]);
    c.run(&["ip", "addr", "add", "10.20.0.100/24", "dev", "c0"]);
    c.run(&["ip", "link", "set", "c0", "up"]);
    let certs = tempfile::tempdir().expect("tempdir");
    let made = Command::new(bin("tandem"))
        .args([
            "cluster",
            "init",
            "--standalone",
            "host-a",
            "host-b",
            "--state-dir",
        ])
        .arg(certs.path())
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let id = |h: &str| certs.path().join("hosts").join(h).display().to_string();
    let src = Daemon::start_in_netns(&a.name, &["--identity-dir", &id("host-a")]);
    let dst = Daemon::start_in_netns(&b.name, &["--identity-dir", &id("host-b")]);
    let doc_a = "[[port_group]]\nname = \"v\"\n\n[[host_port]]\nname = \"h\"\ntap = \"tdmh0\"\nport_group = \"v\"\n";
    let doc_b = "[[port_group]]\nname = \"v\"\n\n[[uplink]]\nname = \"up\"\ninterfaces = [\"up0\"]\nport_group = \"v\"\n";
    for (d, doc) in [(&src, doc_a), (&dst, doc_b)] {
        let path = d.dir.path().join("switch.toml");
        std::fs::write(&path, doc).unwrap();
        d.cli_ok(&["switch", "apply", path.to_str().unwrap()]);
    }
    a.run(&["ip", "addr", "add", "10.20.0.50/24", "dev", "tdmh0"]);
    a.run(&["ip", "link", "set", "tdmh0", "up"]);
    TlsPair {
        src,
        dst,
        a,
        b,
        c,
        _certs: certs,
    }
}

/// A guest on tandem's switch (vhost-user, so QEMU migrates only because
/// the switch keeps the dirty log of what it writes into guest memory)
/// migrates between two hosts in namespaces over their own link, and
/// serves through the destination's switch afterwards; the stream runs
/// over TLS with the hosts' identities.
///
/// ```text
///  ns A: tandemd A, host port tap (10.20.0.50) ─ guest 10.20.0.5 (before)
///  ns B: tandemd B, uplink up0 ── c0 10.20.0.100 in ns C   (guest after)
///  A m0 10.21.0.1 ──── m1 10.21.0.2 B   (the migration stream)
/// ```
#[test]
fn a_guest_on_the_switch_migrates_and_serves_from_the_destination() {
    let _g = serial_guard();
    let p = tls_pair("m", "10.21.0");
    let (src, dst, a, b, c) = (&p.src, &p.dst, &p.a, &p.b, &p.c);

    let spec = src
        .guest_spec("ms", "")
        .replace("tandem.ip=10.99.0.2/24", "tandem.ip=10.20.0.5/24")
        .replace(
            "backend = \"user\"",
            "backend = \"switch\"\nport_group = \"v\"",
        );
    let path = src.dir.path().join("ms.toml");
    std::fs::write(&path, spec).unwrap();
    src.cli_ok(&["vm", "create", path.to_str().unwrap(), "--start"]);
    src.wait_console("ms", READY, BOOT);
    let ask = |ns: &tandem_tests::Netns| {
        ns.within(|| {
            tandem_tests::request("10.20.0.5:7070", "PING", Duration::from_secs(3))
                .map_err(|e| e.to_string())
        })
    };
    assert_eq!(ask(a).as_deref(), Ok("PONG"), "before the migration");
    // Durable records, on the disk the migration copies.
    let say = |ns: &tandem_tests::Netns, line: &str| {
        let line = line.to_string();
        ns.within(move || {
            tandem_tests::request("10.20.0.5:7070", &line, Duration::from_secs(5))
                .map_err(|e| e.to_string())
        })
    };
    for i in 1..=5 {
        assert_eq!(
            say(a, &format!("PUT record-{i}")).as_deref(),
            Ok(format!("OK {i}").as_str())
        );
    }

    // A destination without an identity would take the stream in the
    // clear: refused before anything moves, nothing left there.
    let plain = Daemon::start_in_netns(&b.name, &[]);
    let out = src.cli(&[
        "migrate",
        "ms",
        "--to-socket",
        plain.socket.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    // (It also lacks the VM's port group: the spec check says so first.)
    assert!(
        !out.status.success() && err.contains("port group `v` does not exist"),
        "{err}"
    );
    let path = plain.dir.path().join("switch.toml");
    std::fs::write(&path, "[[port_group]]\nname = \"v\"\n").unwrap();
    plain.cli_ok(&["switch", "apply", path.to_str().unwrap()]);
    let out = src.cli(&[
        "migrate",
        "ms",
        "--to-socket",
        plain.socket.to_str().unwrap(),
        "--listen",
        "10.21.0.2:0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("over TLS"), "{err}");
    assert_destination_clean(&plain, "a destination without an identity");
    drop(plain);
    assert_eq!(src.info("ms")["qmp_status"], "running");

    // Negative control of the authorization: a destination told to admit
    // only `host-x` refuses host-a's certificate on the stream; the
    // migration fails, the guest runs on at the source, nothing is left.
    let info = src.info("ms");
    let (code, body) = dst.api_post(
        "/v1/migrations/incoming",
        &serde_json::json!({
            "spec_toml": info["spec_toml"],
            "uuid": info["uuid"],
            "listen": "10.21.0.2:0",
            "source_tls_name": "host-x",
        }),
    );
    assert_eq!(code, 201, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (code, body) = src.api_post(
        "/v1/vms/ms/migrate",
        &serde_json::json!({ "uri": ready["uri"], "tls_hostname": ready["tls_hostname"] }),
    );
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let (code, body) = src.api_get("/v1/vms/ms/migration");
        assert_eq!(code, 200, "{body}");
        let r: serde_json::Value = serde_json::from_str(&body).unwrap();
        if r["phase"] != "running" {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the refused stream never ended: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(report["phase"], "failed", "{report:#}");
    assert_eq!(src.info("ms")["qmp_status"], "running");
    // The destination never ran the guest; its QEMU still waits for an
    // admitted stream, and goes as `tandem migrate` removes it (or after
    // its accept timeout).
    assert_ne!(dst.info("ms")["qmp_status"], "running");
    dst.cli_ok(&["vm", "destroy", "ms"]);
    assert_destination_clean(dst, "a source the destination does not admit");
    assert_eq!(ask(a).as_deref(), Ok("PONG"), "after the refused stream");

    // The two hosts share this machine's files, so only `--copy-storage`
    // makes it copy the disk: over NBD with TLS, the destination admitting
    // only host-a's certificate (on the NBD server and on the stream, here
    // two multifd streams besides the main one).
    let source_disk = src.dir.path().join("ms-data.qcow2");
    let out = src.cli_ok(&[
        "--json",
        "migrate",
        "ms",
        "--to-socket",
        dst.socket.to_str().unwrap(),
        "--listen",
        "10.21.0.2:0",
        "--copy-storage",
        "--multifd",
        "2",
    ]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let report = lines.last().expect("a report").clone();
    assert_eq!(report["phase"], "done", "{report:#}");
    // The disk was copied, then memory; progress per phase never goes
    // backwards (a small disk may be copied before the first reading).
    assert!(report["storage_bytes"].as_u64().unwrap() > 0, "{report:#}");
    assert!(report["multifd_bytes"].as_u64().unwrap() > 0, "{report:#}");
    assert!(report["storage_ms"].as_u64().is_some(), "{report:#}");
    for phase in ["storage", "memory"] {
        let f: Vec<f64> = lines[..lines.len() - 1]
            .iter()
            .filter(|e| e["phase"] == phase)
            .map(|e| e["fraction"].as_f64().expect("fraction"))
            .collect();
        assert!(
            phase == "storage" || !f.is_empty(),
            "no {phase} progress: {out}"
        );
        assert!(
            f.windows(2).all(|w| w[0] <= w[1]),
            "{phase} went backwards: {f:?}"
        );
    }
    assert!(vm_names(src).is_empty());
    assert_eq!(dst.info("ms")["state"], "running");
    assert!(
        dst.log().contains("tls=true"),
        "the stream was not TLS:\n{}",
        dst.log()
    );
    // The destination runs on its own copy, equal to the source's disk.
    let spec = dst.info("ms")["spec_toml"].as_str().unwrap().to_string();
    let copy = dst.state_dir.join("vms/ms/disks/data.qcow2");
    assert!(
        spec.contains(&copy.display().to_string()),
        "the destination's spec does not use its copy {}:\n{spec}",
        copy.display()
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(&source_disk)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "the copy differs from the source's disk: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    // The destination's switch carries the guest now: a client that only
    // reaches B's uplink is served (bounded retries: its first ARP may
    // race the guest's rings coming up).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ask(c) {
            Ok(r) if r == "PONG" => break,
            other => assert!(
                Instant::now() < deadline,
                "the migrated guest does not answer through the destination's switch: {other:?}\n{}",
                dst.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!dst.console("ms").contains(READY));
    // Every fsync'd record survived, and the copy takes new ones.
    assert_eq!(say(c, "LAST").as_deref(), Ok("LAST 5"));
    for i in 1..=5 {
        assert_eq!(
            say(c, &format!("GET {i}")).as_deref(),
            Ok(format!("REC {i} record-{i}").as_str())
        );
    }
    assert_eq!(say(c, "PUT after").as_deref(), Ok("OK 6"));
}

/// The API's steps one by one: after QEMU completes, the source waits
/// paused in QEMU's postmigrate state and cannot be resumed by hand (the
/// destination may run the guest); only the confirm step ends it.
#[test]
fn a_completed_source_waits_for_its_confirm() {
    let _g = serial_guard();
    let src = Daemon::start();
    let dst = Daemon::start();
    src.create_guest("mw", "");
    src.cli_ok(&["vm", "start", "mw"]);
    src.wait_console("mw", READY, BOOT);
    let info = src.info("mw");
    let (code, body) = dst.api_post(
        "/v1/migrations/incoming",
        &serde_json::json!({
            "spec_toml": info["spec_toml"],
            "uuid": info["uuid"],
            "listen": "127.0.0.1:0",
        }),
    );
    assert_eq!(code, 201, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (code, body) = src.api_post(
        "/v1/vms/mw/migrate",
        &serde_json::json!({ "uri": ready["uri"] }),
    );
    assert_eq!(code, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while {
        let i = src.info("mw");
        i["qmp_status"] != "postmigrate" || i["state"] != "paused"
    } {
        assert!(Instant::now() < deadline, "{:#}", src.info("mw"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = src.cli(&["vm", "resume", "mw"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("could run the guest twice"),
        "{err}"
    );
    // A second migration of the waiting source is refused too.
    let (code, _) = src.api_post(
        "/v1/vms/mw/migrate",
        &serde_json::json!({ "uri": ready["uri"] }),
    );
    assert_ne!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while dst.info("mw")["state"] != "running" {
        assert!(Instant::now() < deadline, "{:#}", dst.info("mw"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, body) = src.api_post(
        "/v1/vms/mw/migration/confirm",
        &serde_json::json!({ "destination_running": true }),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"done\""), "{body}");
    assert!(vm_names(&src).is_empty());
    assert!(src.qemu_processes().is_empty());
}

/// A `tandem migrate` running in the background, its `--json` progress
/// read as it comes.
struct Background {
    child: std::process::Child,
    events: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Background {
    fn start(src: &Daemon, args: &[&str]) -> Background {
        let mut child = Command::new(bin("tandem"))
            .arg("--socket")
            .arg(&src.socket)
            .arg("--json")
            .arg("migrate")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Background { child, events }
    }

    /// Waits until memory is on its way (some bytes sent).
    fn wait_sending(&self) {
        self.wait_moving("memory");
    }

    /// Waits until the disks' copy is under way (some bytes copied).
    fn wait_copying(&self) {
        self.wait_moving("storage");
    }

    /// Waits for a progress event of `phase` with some bytes done.
    fn wait_moving(&self, phase: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self
                .events
                .recv_timeout(left)
                .expect("no progress from tandem migrate within 30 s");
            if e["phase"] == phase && e["done"].as_u64().unwrap_or(0) > 0 {
                return;
            }
        }
    }

    /// Waits for the command's end (bounded): (success, stderr).
    fn finish(mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tandem migrate did not end within 90 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status.success(), err)
    }
}

/// The failures the operator cannot prevent, mid-stream: the migration
/// link cut, the destination's tandemd killed (and restarted), the
/// destination's QEMU killed. Each time the guest runs on at the source
/// and nothing of it is left on the destination. Last, the source's
/// tandemd restarts mid-stream and the migration still completes.
///
/// ```text
///  A m0 10.22.0.1 ──── m1 10.22.0.2 B   (the migration stream)
/// ```
#[test]
fn a_dead_link_or_destination_leaves_the_vm_on_the_source() {
    let _g = serial_guard();
    let a = tandem_tests::Netns::new("da");
    let b = tandem_tests::Netns::new("db");
    tandem_tests::sh(&format!(
        "ip link add m0 netns {} type veth peer name m1 netns {}",
        a.name, b.name
    ));
    a.run(&["ip", "addr", "add", "10.22.0.1/24", "dev", "m0"]);
    a.run(&["ip", "link", "set", "m0", "up"]);
    b.run(&["ip", "addr", "add", "10.22.0.2/24", "dev", "m1"]);
    b.run(&["ip", "link", "set", "m1", "up"]);
    let mut src = Daemon::start_in_netns(&a.name, &[]);
    let mut dst = Daemon::start_in_netns(&b.name, &[]);
    src.create_guest("md", "");
    src.cli_ok(&["vm", "start", "md"]);
    src.wait_console("md", READY, BOOT);
    let dst_socket = dst.socket.to_str().unwrap().to_string();
    // `tandem migrate md` to B over the A–B link at `mib_s` MiB/s.
    let to_b = |mib_s: &str, extra: &[&str]| {
        let mut args = vec![
            "md",
            "--to-socket",
            &dst_socket,
            "--listen",
            "10.22.0.2:0",
            "--bandwidth",
            mib_s,
        ];
        args.extend_from_slice(extra);
        Background::start(&src, &args)
    };
    let runs_on = |why: &str| {
        let info = src.info("md");
        assert_eq!(info["qmp_status"], "running", "{why}: {info:#}");
        let t = *ticks(&src.console("md")).last().unwrap_or(&0);
        src.wait_console(
            "md",
            &format!("tandem-guest: tick {}", t + 1),
            Duration::from_secs(30),
        );
    };

    // The link is cut once memory flows: nothing more is sent, and the
    // ladder aborts after the dead-link bound (3 s), well before its
    // first stall window (10 s) would climb a rung.
    let m = to_b("4", &["--stall-s", "10", "--link-timeout-s", "3"]);
    m.wait_sending();
    b.run(&["ip", "link", "set", "m1", "down"]);
    let (ok, err) = m.finish();
    assert!(!ok, "{err}");
    assert!(
        err.contains("was aborted") && err.contains("nothing was sent"),
        "{err}"
    );
    b.run(&["ip", "link", "set", "m1", "up"]);
    let st = src.cli_json(&["migrate", "md", "--status"]);
    assert_eq!(st["phase"], "aborted", "{st:#}");
    assert!(
        st["message"]
            .as_str()
            .unwrap_or("")
            .contains("nothing was sent"),
        "{st:#}"
    );
    runs_on("after a cut link");
    assert_destination_clean(&dst, "a cut link");

    // The link is cut while the disk is copied (1 MiB/s): the copy's
    // NBD connection has writes in flight that TCP would retry for many
    // minutes (and with a write-blocking mirror, so would the guest's
    // own writes). The source cuts that connection when it gives up, so
    // the abort is prompt and the guest's disk is its own again.
    let t = Instant::now();
    let m = to_b("1", &["--copy-storage", "--link-timeout-s", "3"]);
    m.wait_copying();
    b.run(&["ip", "link", "set", "m1", "down"]);
    let (ok, err) = m.finish();
    let took = t.elapsed();
    assert!(!ok, "{err}");
    assert!(
        err.contains("was aborted") && err.contains("the disks' copy moved nothing"),
        "{err}"
    );
    // Still cut off: QEMU answers its monitor and the guest runs, with no
    // QMP call left waiting on the dead connection.
    runs_on("after a link cut during the disks' copy");
    let log = src.log();
    assert!(
        took < Duration::from_secs(12) && !log.contains("QMP timed out"),
        "the abort of a cut disk copy took {took:?}:\n{err}\n{}",
        tandem_tests::tail(&log, 20)
    );
    b.run(&["ip", "link", "set", "m1", "up"]);
    assert_destination_clean(&dst, "a link cut during the disks' copy");

    // The destination's tandemd dies mid-stream (its QEMU carries on) and
    // comes back: the VM of an incoming migration that never ran there is
    // removed by the new tandemd, and the source runs on (whether the
    // stream completed first or not).
    let m = to_b("16", &[]);
    m.wait_sending();
    dst.restart(libc::SIGKILL);
    let (ok, err) = m.finish();
    assert!(!ok, "{err}");
    assert!(
        err.contains("the VM runs on at the source") || err.contains("the source resumed it"),
        "{err}"
    );
    runs_on("after the destination's tandemd was killed");
    assert_destination_clean(&dst, "a killed destination tandemd");
    assert!(
        dst.log()
            .contains("an incoming migration the previous tandemd did not finish"),
        "{}",
        dst.log()
    );

    // The destination's QEMU dies mid-stream.
    let m = to_b("4", &[]);
    m.wait_sending();
    for pid in dst.qemu_processes() {
        // SAFETY: kill(2) on a pid of a QEMU this test's daemon started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let (ok, err) = m.finish();
    assert!(!ok && err.contains("failed"), "{err}");
    runs_on("after the destination's QEMU was killed");
    assert_destination_clean(&dst, "a killed destination QEMU");

    // The source's tandemd restarts mid-stream (QEMU carries on): the new
    // tandemd takes the migration up again, the CLI rides out the short
    // outage, and the migration ends as if nothing happened.
    let m = to_b("16", &[]);
    m.wait_sending();
    src.restart(libc::SIGKILL);
    let (ok, err) = m.finish();
    assert!(ok, "{err}\n{}", src.log());
    assert!(
        src.log()
            .contains("took up a migration the previous tandemd did not finish"),
        "{}",
        src.log()
    );
    assert!(vm_names(&src).is_empty());
    assert_eq!(dst.info("md")["state"], "running");
}

/// Issue 18: a protected guest on the switch migrates under a client's
/// load, and every reply any client got survives a later failover. The
/// source holds its checkpoints and the output with them from the start
/// of the migration; the destination's switch holds the guest's output
/// from before it runs there until its own first commit to the same
/// backup (one generation up); then the source's held replies go out.
/// Killing the destination's QEMU afterwards resumes the guest on the
/// backup, which must know every record a client was told was stored.
#[test]
fn a_protected_guest_migrates_under_load_and_every_reply_survives_a_failover() {
    let _g = serial_guard();
    let p = tls_pair("p", "10.22.0");
    let (src, dst, a, c) = (&p.src, &p.dst, &p.a, &p.c);
    let d = tandem_tests::Netns::new("pd");
    // The backup, a host of its own: replication over a unix socket (this
    // machine), its switch's host port the only way to the guest there.
    let repl = tempfile::Builder::new()
        .prefix("tandem-pm-")
        .tempdir()
        .unwrap();
    let endpoint = format!("unix:{}", repl.path().join("repl.sock").display());
    let bk = Daemon::start_in_netns(&d.name, &["--repl-listen", &endpoint]);
    let doc = "[[port_group]]\nname = \"v\"\n\n[[host_port]]\nname = \"h\"\ntap = \"tdmh1\"\nport_group = \"v\"\n";
    let path = bk.dir.path().join("switch.toml");
    std::fs::write(&path, doc).unwrap();
    bk.cli_ok(&["switch", "apply", path.to_str().unwrap()]);
    d.run(&["ip", "addr", "add", "10.20.0.60/24", "dev", "tdmh1"]);
    d.run(&["ip", "link", "set", "tdmh1", "up"]);

    let spec = src
        .guest_spec("ps", "")
        .replace("tandem.ip=10.99.0.2/24", "tandem.ip=10.20.0.5/24")
        .replace(
            "backend = \"user\"",
            "backend = \"switch\"\nport_group = \"v\"",
        );
    let path = src.dir.path().join("ps.toml");
    std::fs::write(&path, spec).unwrap();
    src.cli_ok(&["vm", "create", path.to_str().unwrap(), "--start"]);
    src.wait_console("ps", READY, BOOT);
    let say = |ns: &tandem_tests::Netns, line: &str| {
        let line = line.to_string();
        ns.within(move || {
            tandem_tests::request("10.20.0.5:7070", &line, Duration::from_secs(5))
                .map_err(|e| e.to_string())
        })
    };
    // Bounded retries: the first ARP may race the guest's rings, or the
    // fabric's learning of where the guest now is.
    let say_until = |ns: &tandem_tests::Netns, line: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match say(ns, line) {
                Ok(r) => return r,
                Err(e) => assert!(Instant::now() < deadline, "{line}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(say_until(a, "PING"), "PONG");
    src.cli_ok(&["protect", "ps", "--backup", &endpoint, "--epoch-ms", "50"]);
    let deadline = Instant::now() + Duration::from_secs(90);
    while !src
        .cli_json(&["ft", "status", "ps"])
        .as_array()
        .is_some_and(|v| v.iter().any(|s| s["state"] == "protected"))
    {
        assert!(Instant::now() < deadline, "never protected:\n{}", src.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    // The client writes durable records as fast as it is answered, from
    // before the migration until it ends (then the guest is no longer
    // behind A's switch). Every `OK n` it gets is a record the guest
    // promised to keep.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_client = stop.clone();
    let client = a.spawn(move || {
        let mut got = Vec::new();
        let started = Instant::now();
        let mut k = 0;
        while !stop_client.load(std::sync::atomic::Ordering::SeqCst)
            && started.elapsed() < Duration::from_secs(120)
            && k < 100_000
        {
            k += 1;
            let text = format!("load-{k}");
            if let Ok(r) = tandem_tests::request(
                "10.20.0.5:7070",
                &format!("PUT {text}"),
                Duration::from_secs(2),
            ) {
                if let Some(n) = r.strip_prefix("OK ").and_then(|n| n.parse::<u64>().ok()) {
                    got.push((n, text));
                }
            }
        }
        got
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while src.cli_json(&["ft", "status", "ps"])[0]["output"]["released_frames"]
        .as_u64()
        .unwrap_or(0)
        < 20
    {
        assert!(Instant::now() < deadline, "the client is not served");
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = src.cli_ok(&[
        "--json",
        "migrate",
        "ps",
        "--to-socket",
        dst.socket.to_str().unwrap(),
        "--listen",
        "10.22.0.2:0",
    ]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut replies = client.join().expect("client");
    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("a report")).unwrap();
    assert_eq!(report["phase"], "done", "{report:#}");
    assert!(report["first_commit_ms"].as_u64().is_some(), "{report:#}");
    assert!(
        replies.len() >= 5,
        "the client was barely served: {replies:?}"
    );
    assert!(vm_names(src).is_empty());
    assert!(
        src.log()
            .contains("protection handed over to the migration's destination"),
        "{}",
        src.log()
    );
    // The destination holds the guest's output from the start: its gate
    // was on the switch ports before the stream completed.
    let log = dst.log();
    let gated = log
        .find("output commit gate installed")
        .expect("a gate on B");
    let ran = log
        .find("incoming migration completed; the guest runs here")
        .expect("B ran the guest");
    assert!(gated < ran, "B's gate came after the guest ran:\n{log}");

    // Served from the destination now, protected there.
    for i in 1..=3 {
        let r = say_until(c, &format!("PUT after-{i}"));
        let n = r
            .strip_prefix("OK ")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("PUT after-{i}: {r}"));
        replies.push((n, format!("after-{i}")));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dst
        .cli_json(&["ft", "status", "ps"])
        .as_array()
        .is_some_and(|v| {
            v.iter()
                .any(|s| s["role"] == "primary" && s["state"] == "protected")
        })
    {
        assert!(
            Instant::now() < deadline,
            "B never protected:\n{}",
            dst.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The destination's QEMU dies: the backup resumes the guest, and the
    // guest there knows every record any client was told was stored.
    let pid = dst.info("ps")["pid"].as_u64().expect("pid") as i32;
    // SAFETY: kill(2) of the QEMU this test's daemon started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let running_on_backup = || {
        let out = bk.cli(&["--json", "vm", "info", "ps"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|v| v["state"] == "running")
    };
    while !running_on_backup() {
        assert!(
            Instant::now() < deadline,
            "the backup did not take over:\n{}",
            bk.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !bk.console("ps").contains(READY),
        "the backup rebooted the guest"
    );
    let last = say_until(&d, "LAST");
    let last: u64 = last
        .strip_prefix("LAST ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    replies.sort();
    for (n, text) in &replies {
        assert!(
            *n <= last,
            "record {n} ({text}) was acknowledged, the backup has {last}"
        );
        assert_eq!(
            say_until(&d, &format!("GET {n}")),
            format!("REC {n} {text}"),
            "an acknowledged record is lost or differs after the failover"
        );
    }
}
