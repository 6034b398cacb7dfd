//! Failover in constant time (issue 14 §2, audit H9): the backup resumes
//! the VM on its replica in place, copying nothing. Its QEMU maps the
//! replica's RAM file itself and its disks are qcow2 overlays backed by
//! the replica's; the guest's memory and disk data survive, also across a
//! cold restart on the overlay; and a takeover that fails before the guest
//! runs leaves the replica armed and byte for byte intact, and is retried.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::{request, serial_guard, ticks, Daemon, READY};

const BOOT: Duration = Duration::from_secs(90);

fn wait_ft(
    d: &Daemon,
    vm: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let out = d.cli(&["--json", "ft", "status", vm]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            // A host can be the VM's backup and its primary at once (after
            // a failover, protecting it onwards): any entry that matches.
            if let Some(s) = v.as_array().and_then(|a| a.iter().find(|s| pred(s))) {
                return s.clone();
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "{what} not reached within {timeout:?}; status: {}\ntandemd log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                tandem_tests::tail(&d.log(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on the loopback (for the guest service's host forward).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The backup's unix replication endpoint, in a directory kept for the
/// test's life.
fn endpoint() -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix("tandem-failover-")
        .tempdir()
        .unwrap();
    let ep = format!("unix:{}", dir.path().join("repl.sock").display());
    (dir, ep)
}

/// Boots `vm` (128 MiB, its data disk, the guest service forwarded to
/// `port` on the loopback) on `a` and protects it to `endpoint` until the
/// backup `b` stands by with a resumable replica.
fn boot_and_protect(a: &Daemon, b: &Daemon, endpoint: &str, vm: &str, port: u16) {
    // User networking's own subnet, so the port forward reaches it.
    let spec = a
        .guest_spec(vm, "")
        .replace(
            "backend = \"user\"\n",
            &format!(
                "backend = \"user\"\nhost_forwards = [{{ host_port = {port}, guest_port = 7070 }}]\n"
            ),
        )
        .replace(
            "tandem.ip=10.99.0.2/24",
            "tandem.ip=10.0.2.15/24 tandem.gw=10.0.2.2",
        );
    assert!(
        spec.contains("host_forwards") && spec.contains("10.0.2.15"),
        "{spec}"
    );
    let path = a.dir.path().join(format!("{vm}.toml"));
    std::fs::write(&path, spec).unwrap();
    a.cli_ok(&["vm", "create", path.to_str().unwrap()]);
    a.cli_ok(&["vm", "start", vm]);
    a.wait_console(vm, READY, BOOT);
    a.cli_ok(&["protect", vm, "--backup", endpoint, "--epoch-ms", "50"]);
    wait_ft(a, vm, "protection", Duration::from_secs(90), |s| {
        s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) >= 5
    });
    wait_ft(b, vm, "backup standby", Duration::from_secs(20), |s| {
        s["state"] == "standby"
    });
}

fn guest(port: u16, line: &str) -> String {
    request(&format!("127.0.0.1:{port}"), line, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// `PUT`s until the guest answers (its port forward may need a moment on
/// a freshly resumed QEMU).
fn put(port: u16, text: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match request(
            &format!("127.0.0.1:{port}"),
            &format!("PUT {text}"),
            Duration::from_secs(5),
        ) {
            Ok(r) if r.starts_with("OK ") => return r[3..].parse().unwrap(),
            other => assert!(
                Instant::now() < deadline,
                "PUT {text} never answered: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The inode numbers of the files QEMU `pid` maps (field 5 of
/// `/proc/PID/maps`), by path.
fn mapped_inodes(pid: u32) -> Vec<(String, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6).then(|| (f[5..].join(" "), f[4].parse().unwrap_or(0)))
        })
        .collect()
}

/// The files QEMU `pid` has open.
fn open_files(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect()
}

fn qemu_img_info(image: &Path) -> Value {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What the replica holds: RAM and disk, byte for byte.
fn replica_bytes(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join("ram")).unwrap(),
        std::fs::read(dir.join("disk-data.raw")).unwrap(),
    )
}

#[test]
fn a_takeover_runs_the_vm_on_its_replica_in_place_and_copies_nothing() {
    let _g = serial_guard();
    let (_link, ep) = endpoint();
    let b = Daemon::start_with(&["--repl-listen", &ep]);
    let a = Daemon::start();
    let vm = "inplace";
    let port = free_port();
    boot_and_protect(&a, &b, &ep, vm, port);
    // Records the guest fsyncs to its data disk before the crash.
    let before: Vec<u64> = (1..=3).map(|i| put(port, &format!("before-{i}"))).collect();
    // Until the epoch holding the last write is committed.
    let st = wait_ft(
        &a,
        vm,
        "a commit after the writes",
        Duration::from_secs(10),
        |s| s["state"] == "protected",
    );
    let committed = st["last_committed"].as_u64().unwrap();
    wait_ft(&a, vm, "two more commits", Duration::from_secs(10), |s| {
        s["last_committed"].as_u64().unwrap_or(0) >= committed + 2
    });
    let at_kill = *ticks(&a.console(vm)).last().unwrap();
    let pid = a.info(vm)["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) of the QEMU this test's daemon started.
    unsafe { libc::kill(pid, libc::SIGKILL) };

    let st = wait_ft(&b, vm, "takeover", Duration::from_secs(30), |s| {
        s["state"] == "failed-over"
    });
    let restore_ms = st["failover"]["restore_ms"].as_f64().unwrap();
    eprintln!("restore (decision -> guest running): {restore_ms:.0} ms");
    let replica = b
        .state_dir
        .join("replicas")
        .join(vm)
        .canonicalize()
        .unwrap();
    let info = b.info(vm);
    assert_eq!(info["state"], "running", "{info:#}");
    let qemu = info["pid"].as_u64().unwrap() as u32;

    // RAM: QEMU maps the replica's RAM file itself (same inode), and no
    // copy of it exists on the RAM file system.
    let ram = replica.join("ram");
    let ino = std::fs::metadata(&ram).unwrap().ino();
    let maps = mapped_inodes(qemu);
    assert!(
        maps.iter()
            .any(|(p, i)| *i == ino && Path::new(p) == ram.as_path()),
        "QEMU {qemu} does not map {} (inode {ino}): {maps:?}",
        ram.display()
    );
    assert_eq!(info["ram_file"], ram.display().to_string(), "{info:#}");
    let copies: Vec<_> = walk(&b.ram_dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ram"))
        .collect();
    assert!(copies.is_empty(), "RAM copied to tmpfs: {copies:?}");

    // Disk: an overlay in the VM's directory, backed by the replica's
    // disk, both open in QEMU; nothing else of the disk was copied.
    let overlay = b
        .state_dir
        .join("vms")
        .join(vm)
        .join("overlay-data.qcow2")
        .canonicalize()
        .unwrap();
    let img = qemu_img_info(&overlay);
    assert_eq!(img["format"], "qcow2", "{img:#}");
    assert_eq!(
        img["backing-filename"],
        replica.join("disk-data.raw").display().to_string(),
        "{img:#}"
    );
    assert_eq!(img["backing-filename-format"], "raw", "{img:#}");
    let open = open_files(qemu);
    for f in [&overlay, &replica.join("disk-data.raw")] {
        assert!(
            open.contains(f),
            "QEMU has no {} open: {open:?}",
            f.display()
        );
    }
    let overlay_len = std::fs::metadata(&overlay).unwrap().len();
    assert!(
        overlay_len < 8 << 20,
        "the overlay holds {overlay_len} bytes"
    );
    let vm_files: Vec<_> = walk(&b.state_dir.join("vms").join(vm));
    assert!(
        !vm_files.iter().any(|p| p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("restored-"))),
        "a disk was copied: {vm_files:?}"
    );
    // The directory is the VM's own now.
    let owner: Value =
        serde_json::from_slice(&std::fs::read(replica.join("owned-by-vm.json")).unwrap()).unwrap();
    assert_eq!(owner["vm"], vm, "{owner}");
    assert_eq!(owner["uuid"], info["uuid"], "{owner}");

    // The guest resumed (no boot) from a committed epoch, with its memory
    // and its disk's records.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(t) = ticks(&b.console(vm)).first() {
            break *t;
        }
        assert!(Instant::now() < deadline, "resumed guest never ticked");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !b.console(vm).contains(READY),
        "the backup rebooted the guest"
    );
    assert!(
        first <= at_kill + 1,
        "resumed at {first}, killed at {at_kill}"
    );
    for (i, seq) in before.iter().enumerate() {
        assert_eq!(
            guest(port, &format!("GET {seq}")),
            format!("REC {seq} before-{}", i + 1)
        );
    }
    // Writes go to the overlay, never to the replica's disk.
    let base_disk = std::fs::read(replica.join("disk-data.raw")).unwrap();
    let after = put(port, "after-failover");
    assert_eq!(after, before.len() as u64 + 1);
    assert!(
        std::fs::read(replica.join("disk-data.raw")).unwrap() == base_disk,
        "the guest wrote into the replica's disk"
    );

    // The next protection from this host, to a third one: the tracker
    // reads the RAM file where it is (on disk), and the disk mirror copies
    // the whole overlay chain.
    let (_link_c, ep_c) = endpoint();
    let c = Daemon::start_with(&["--repl-listen", &ep_c]);
    b.cli_ok(&["protect", vm, "--backup", &ep_c, "--epoch-ms", "50"]);
    wait_ft(&b, vm, "protection from B", Duration::from_secs(90), |s| {
        s["role"] == "primary"
            && s["state"] == "protected"
            && s["last_committed"].as_u64().unwrap_or(0) >= 3
    });
    wait_ft(&c, vm, "C's standby", Duration::from_secs(20), |s| {
        s["state"] == "standby"
    });
    let c_disk =
        std::fs::read(c.state_dir.join("replicas").join(vm).join("disk-data.raw")).unwrap();
    assert_eq!(
        c_disk.len() as u64,
        img["virtual-size"].as_u64().unwrap(),
        "C's replica of the disk"
    );
    b.cli_ok(&["unprotect", vm]);
    drop(c);

    // A cold restart on B boots from the overlay over the replica: the
    // guest reads every record back from its disk. The replica's RAM file
    // goes (the new QEMU has fresh RAM); the disk base stays.
    b.cli_ok(&["vm", "stop", vm]);
    b.wait_info(vm, Duration::from_secs(60), |v| v["state"] == "shutoff")
        .unwrap();
    b.cli_ok(&["vm", "start", vm]);
    b.wait_console(vm, READY, BOOT);
    for (seq, text) in [(1, "before-1"), (3, "before-3"), (after, "after-failover")] {
        assert_eq!(
            guest(port, &format!("GET {seq}")),
            format!("REC {seq} {text}")
        );
    }
    assert!(!ram.exists(), "the replica's RAM outlived its QEMU");
    assert!(replica.join("disk-data.raw").is_file());
    let info = b.info(vm);
    assert_ne!(info["ram_file"], ram.display().to_string(), "{info:#}");

    // Deleting the VM deletes the directory it owns.
    b.cli_ok(&["vm", "destroy", vm]);
    assert!(!replica.exists(), "{} outlived its VM", replica.display());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The backup's QEMU, through a wrapper: while `fail` exists, a QEMU
/// started to resume a guest (`-incoming`) gets the wrong machine type
/// (q35; the guest's is the default, pc), so
/// it starts and maps the replica's RAM, is given the device state, and
/// refuses it (the machine type is checked in the stream) — a failure
/// after QEMU has the replica in hand, before the guest runs.
fn breakable_qemu(dir: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let fail = dir.join("fail");
    let wrapper = dir.join("qemu");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in\n  *\" -incoming \"*) [ -e '{}' ] && exec qemu-system-x86_64 \"$@\" -machine q35 ;;\nesac\nexec qemu-system-x86_64 \"$@\"\n",
            fail.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&fail, b"").unwrap();
    (wrapper, fail)
}

#[test]
fn a_failed_takeover_leaves_the_replica_armed_and_intact_and_is_retried() {
    let _g = serial_guard();
    let (link, ep) = endpoint();
    let (wrapper, fail) = breakable_qemu(link.path());
    // Silence decides here (a frozen primary tandemd), with time to read
    // the replica before the takeover.
    let b = Daemon::start_with(&[
        "--repl-listen",
        &ep,
        "--qemu",
        wrapper.to_str().unwrap(),
        "--ft-takeover-timeout-ms",
        "6000",
    ]);
    let mut a = Daemon::start();
    let vm = "retried";
    let port = free_port();
    boot_and_protect(&a, &b, &ep, vm, port);
    let seq = put(port, "kept");
    let st = wait_ft(&a, vm, "a commit", Duration::from_secs(10), |s| {
        s["state"] == "protected"
    });
    let committed = st["last_committed"].as_u64().unwrap();
    wait_ft(&a, vm, "two more commits", Duration::from_secs(10), |s| {
        s["last_committed"].as_u64().unwrap_or(0) >= committed + 2
    });
    let at_freeze = *ticks(&a.console(vm)).last().unwrap();
    let a_qemu = a.info(vm)["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) of the tandemd this test started, then of its QEMU
    // (which holds the guest's forwarded port, and which nobody may tell
    // the backup about now).
    unsafe {
        libc::kill(a.pid() as i32, libc::SIGSTOP);
        libc::kill(a_qemu, libc::SIGKILL);
    }
    // The last epoch's apply ends within moments; the takeover comes 6 s
    // after the silence began.
    std::thread::sleep(Duration::from_millis(1500));
    let replica = b.state_dir.join("replicas").join(vm);
    let intact = replica_bytes(&replica);
    let ram_ino = std::fs::metadata(replica.join("ram")).unwrap().ino();
    let in_standby = wait_ft(&b, vm, "still standby", Duration::from_secs(1), |s| {
        s["state"] == "standby"
    });
    assert!(
        !in_standby["detail"]
            .as_str()
            .unwrap_or("")
            .contains("takeover attempt"),
        "took over too early: {in_standby:#}"
    );

    for n in 1..=2 {
        let st = wait_ft(
            &b,
            vm,
            &format!("failed takeover {n}"),
            Duration::from_secs(20),
            |s| {
                s["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("takeover attempt {n} failed"))
            },
        );
        eprintln!("backup after attempt {n}: {}", st["detail"]);
        assert_eq!(st["state"], "standby", "{st:#}");
        let detail = st["detail"].as_str().unwrap();
        assert!(detail.contains("intact and armed: retrying in"), "{st:#}");
        // The failed start let nothing run, and left no QEMU behind.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b.qemu_processes().is_empty() {
            assert!(Instant::now() < deadline, "a failed start's QEMU lives on");
            std::thread::sleep(Duration::from_millis(50));
        }
        // QEMU started, mapped the replica and was given the device state;
        // not a byte of the replica changed, nor did its RAM file go.
        assert_eq!(
            std::fs::metadata(replica.join("ram")).unwrap().ino(),
            ram_ino
        );
        assert!(
            replica_bytes(&replica) == intact,
            "attempt {n} changed the replica"
        );
        assert!(!replica.join("owned-by-vm.json").exists());
    }
    let qemu_log =
        std::fs::read_to_string(b.state_dir.join("vms").join(vm).join("qemu.log")).unwrap();
    assert!(
        qemu_log.contains("Machine type received is"),
        "the failure was not the device-state load: {qemu_log}"
    );
    assert!(
        b.log().contains("ERROR") && b.log().contains("takeover attempt 2 failed"),
        "not reported as an error"
    );

    // Fixed: the next retry resumes the guest from the intact replica.
    std::fs::remove_file(&fail).unwrap();
    let st = wait_ft(&b, vm, "takeover", Duration::from_secs(30), |s| {
        s["state"] == "failed-over"
    });
    eprintln!("after the retry: {st}");
    let info = b.info(vm);
    assert_eq!(info["state"], "running", "{info:#}");
    let qemu = info["pid"].as_u64().unwrap() as u32;
    assert!(mapped_inodes(qemu).iter().any(|(_, i)| *i == ram_ino));
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(t) = ticks(&b.console(vm)).first() {
            break *t;
        }
        assert!(Instant::now() < deadline, "resumed guest never ticked");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !b.console(vm).contains(READY),
        "the backup rebooted the guest"
    );
    assert!(
        first <= at_freeze + 2,
        "resumed at {first}, frozen at {at_freeze}"
    );
    assert_eq!(
        guest(port, &format!("GET {seq}")),
        format!("REC {seq} kept")
    );
    // The frozen primary is fenced for good (the lease froze its QEMU).
    // SAFETY: as above.
    unsafe { libc::kill(a.pid() as i32, libc::SIGCONT) };
    a.kill(libc::SIGKILL);
}
