//! Replication between two tandemds on this machine (a unix-socket
//! replication link; the network drill uses namespaces): protection,
//! takeover after the primary's QEMU dies, and fencing in a partition.

use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::{serial_guard, ticks, Daemon, SmallFs, READY};

const BOOT: Duration = Duration::from_secs(90);

fn ft(d: &Daemon, vm: &str) -> Value {
    let v = d.cli_json(&["ft", "status", vm]);
    v.as_array()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or(Value::Null)
}

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
            if let Some(s) = v.as_array().and_then(|a| a.first()) {
                if pred(s) {
                    return s.clone();
                }
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "{what} not reached within {timeout:?}; status: {}\ntandemd log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                tandem_tests::tail(&d.log(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Pair {
    a: Daemon,
    b: Daemon,
    endpoint: String,
}

fn pair() -> Pair {
    pair_with(&[])
}

/// A pair whose backup tandemd gets `backup_args` as well.
fn pair_with(backup_args: &[&str]) -> Pair {
    pair_on(None, backup_args)
}

/// [`pair_with`], the backup keeping its state in `backup_state` (a
/// fresh directory when `None`).
fn pair_on(backup_state: Option<std::path::PathBuf>, backup_args: &[&str]) -> Pair {
    let b_dir = tempfile::Builder::new()
        .prefix("tandem-ft-link-")
        .tempdir()
        .expect("tempdir");
    let endpoint = format!("unix:{}/repl.sock", b_dir.path().display());
    // Keep the directory for the daemon's lifetime.
    let b_path = b_dir.keep();
    let _ = b_path;
    let mut args = vec!["--repl-listen", endpoint.as_str()];
    args.extend_from_slice(backup_args);
    let b = Daemon::start_in(backup_state, &args);
    let a = Daemon::start();
    Pair { a, b, endpoint }
}

fn boot_and_protect(p: &Pair, vm: &str) -> u64 {
    // The disk is replicated too (NBD mirror); this keeps the drill for it.
    let spec = p.a.guest_spec(vm, "");
    let cut = spec.find("[[disks]]").expect("disk section");
    let end = spec[cut..]
        .find("[[nics]]")
        .map(|e| cut + e)
        .unwrap_or(spec.len());
    let spec = format!("{}{}", &spec[..cut], &spec[end..]);
    let path = p.a.dir.path().join(format!("{vm}.toml"));
    std::fs::write(&path, spec).expect("write spec");
    p.a.cli_ok(&["vm", "create", path.to_str().unwrap()]);
    p.a.cli_ok(&["vm", "start", vm]);
    p.a.wait_console(vm, READY, BOOT);
    let soft_dirty = tandem_dirty::soft_dirty_support();
    if let Err(why) = &soft_dirty {
        // Demanding what this kernel cannot do is refused up front, with
        // the reason, and nothing is left half set up.
        let out = p.a.cli(&[
            "protect",
            vm,
            "--backup",
            &p.endpoint,
            "--tracker",
            "soft-dirty",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "soft-dirty protect succeeded ({why})"
        );
        assert!(
            err.contains("soft-dirty tracking is not available")
                && err.contains("CONFIG_MEM_SOFT_DIRTY"),
            "unclear refusal: {err}"
        );
        let out =
            p.a.cli(&["protect", vm, "--backup", &p.endpoint, "--tracker", "bogus"]);
        assert!(String::from_utf8_lossy(&out.stderr)
            .contains("expected auto, scan, soft-dirty or uffd"));
    }
    p.a.cli_ok(&["protect", vm, "--backup", &p.endpoint, "--epoch-ms", "50"]);
    let st = wait_ft(&p.a, vm, "protection", Duration::from_secs(60), |s| {
        s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) >= 5
    });
    assert!(st["pause_p50_ms"].as_f64().unwrap() > 0.0, "{st:#}");
    // `auto` takes uffd on these machines: the preload library is built
    // beside tandemd and the kernel (6.7 or later) has asynchronous
    // write-protect; QEMU's probe passed, and punches are watched with
    // inotify (tandemd's RAM files have paths).
    let tracker = st["tracker"].as_str().unwrap_or_default();
    assert!(
        tracker.starts_with("uffd (auto; registered inside QEMU")
            && tracker.ends_with("; punches seen by inotify)"),
        "{st:#}"
    );
    wait_ft(&p.b, vm, "backup standby", Duration::from_secs(10), |s| {
        s["state"] == "standby"
    });
    // Migrating a protected VM onto its own backup host would leave it
    // with no backup elsewhere: the backup refuses to be its destination,
    // and the VM runs on, protected, with nothing left on the backup.
    let out =
        p.a.cli(&["migrate", vm, "--to-socket", p.b.socket.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is the backup of"),
        "{err}"
    );
    assert_eq!(p.a.info(vm)["state"], "running");
    wait_ft(
        &p.a,
        vm,
        "protection goes on",
        Duration::from_secs(10),
        |s| s["state"] == "protected",
    );
    wait_ft(&p.b, vm, "backup standby", Duration::from_secs(10), |s| {
        s["state"] == "standby"
    });
    *ticks(&p.a.console(vm)).last().expect("ticks")
}

#[test]
fn backup_takes_over_when_the_primary_qemu_dies() {
    let _g = serial_guard();
    let p = pair();
    let protected_at = boot_and_protect(&p, "ft1");
    // Let it run protected for a while.
    p.a.wait_console(
        "ft1",
        &format!("tandem-guest: tick {}", protected_at + 5),
        Duration::from_secs(30),
    );
    let pid = p.a.info("ft1")["pid"].as_u64().expect("pid") as i32;
    let at_kill = *ticks(&p.a.console("ft1")).last().unwrap();
    // SAFETY: kill(2) of the QEMU this test's daemon started.
    unsafe { libc::kill(pid, libc::SIGKILL) };

    let st = wait_ft(&p.b, "ft1", "takeover", Duration::from_secs(30), |s| {
        s["state"] == "failed-over"
    });
    let report = &st["failover"];
    assert!(report["epoch"].as_u64().unwrap() >= 5, "{st:#}");
    // The primary saw its QEMU crash and said so: the backup took over on
    // that report, not after its takeover timeout of silence.
    assert!(
        report["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("reports its QEMU crashed"),
        "{st:#}"
    );
    assert!(report["restore_ms"].as_f64().unwrap() > 0.0, "{st:#}");
    let info = p.b.info("ft1");
    assert_eq!(info["state"], "running", "{info:#}");

    // The guest resumed on B from a committed epoch: no fresh boot, and its
    // counter continues from a point between protection and the kill.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(t) = ticks(&p.b.console("ft1")).first() {
            break *t;
        }
        assert!(Instant::now() < deadline, "resumed guest never ticked");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !p.b.console("ft1").contains(READY),
        "the backup rebooted the guest"
    );
    assert!(
        first > protected_at && first <= at_kill + 1,
        "resumed at tick {first}; protected at {protected_at}, killed at {at_kill}"
    );
    p.b.wait_console(
        "ft1",
        &format!("tandem-guest: tick {}", first + 3),
        Duration::from_secs(30),
    );
    // The primary's side knows its guest is gone.
    let a = wait_ft(
        &p.a,
        "ft1",
        "primary stopped",
        Duration::from_secs(10),
        |s| s["state"] == "stopped",
    );
    assert_eq!(p.a.info("ft1")["state"], "crashed", "{a:#}");
}

#[test]
fn partitioned_primary_fences_and_exactly_one_side_runs() {
    let _g = serial_guard();
    let p = pair();
    boot_and_protect(&p, "ft2");
    // Freeze the backup's daemon: the replication link goes silent both ways.
    let b_pid = p.b.pid() as i32;
    // SAFETY: kill(2) on the backup tandemd this test started.
    unsafe { libc::kill(b_pid, libc::SIGSTOP) };
    let fenced = wait_ft(&p.a, "ft2", "self-fence", Duration::from_secs(20), |s| {
        s["state"] == "fenced"
    });
    assert_eq!(p.a.info("ft2")["qmp_status"], "paused", "{fenced:#}");
    // SAFETY: as above.
    unsafe { libc::kill(b_pid, libc::SIGCONT) };
    // The thawed backup finds the primary silent past its takeover timeout,
    // and the fenced primary is reconnecting: whichever gets the backup's
    // lock first wins. Either the backup takes over and refuses the
    // primary, or it takes the primary's connection and never takes over.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let b = ft(&p.b, "ft2");
        let a = ft(&p.a, "ft2");
        if b["state"] == "failed-over" || a["state"] == "protected" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "neither side settled: primary {a:#}, backup {b:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Exactly one side runs the guest, and it stays that way.
    std::thread::sleep(Duration::from_secs(3));
    let a = p.a.info("ft2");
    let a_runs = a["qmp_status"] == "running";
    let b_info = p.b.cli(&["--json", "vm", "info", "ft2"]);
    let b_runs = b_info.status.success()
        && serde_json::from_slice::<Value>(&b_info.stdout).unwrap_or(Value::Null)["state"]
            == "running";
    assert!(
        a_runs != b_runs,
        "primary runs: {a_runs}, backup runs: {b_runs}; primary {a:#}, backup ft {:#}",
        ft(&p.b, "ft2")
    );
    if b_runs {
        assert_eq!(a["qmp_status"], "paused", "{a:#}");
        assert_eq!(ft(&p.b, "ft2")["state"], "failed-over");
    }
}

#[test]
fn a_fenced_primary_resumes_when_the_backup_answers_before_taking_over() {
    let _g = serial_guard();
    // This backup never takes over on its own, so the outcome is certain.
    let p = pair_with(&["--no-auto-failover"]);
    boot_and_protect(&p, "ft5");
    let b_pid = p.b.pid() as i32;
    // SAFETY: kill(2) on the backup tandemd this test started.
    unsafe { libc::kill(b_pid, libc::SIGSTOP) };
    wait_ft(&p.a, "ft5", "self-fence", Duration::from_secs(20), |s| {
        s["state"] == "fenced"
    });
    assert_eq!(p.a.info("ft5")["qmp_status"], "paused");
    let fenced_at = *ticks(&p.a.console("ft5")).last().expect("ticks");
    // SAFETY: as above.
    unsafe { libc::kill(b_pid, libc::SIGCONT) };
    // The backup takes the fenced primary's new connection: the fence is
    // lifted, the guest runs on, and protection comes back.
    wait_ft(
        &p.a,
        "ft5",
        "protection again",
        Duration::from_secs(60),
        |s| s["state"] == "protected",
    );
    assert_eq!(p.a.info("ft5")["qmp_status"], "running");
    p.a.wait_console(
        "ft5",
        &format!("tandem-guest: tick {}", fenced_at + 3),
        Duration::from_secs(30),
    );
    wait_ft(
        &p.b,
        "ft5",
        "backup standby",
        Duration::from_secs(30),
        |s| s["state"] == "standby",
    );
    assert!(
        !p.b.cli(&["vm", "info", "ft5"]).status.success(),
        "the backup started the guest"
    );
}

#[test]
fn unprotect_says_bye_and_the_backup_never_takes_over() {
    let _g = serial_guard();
    let p = pair();
    boot_and_protect(&p, "ft3");
    p.a.cli_ok(&["unprotect", "ft3"]);
    wait_ft(
        &p.b,
        "ft3",
        "backup stopped",
        Duration::from_secs(10),
        |s| s["state"] == "stopped",
    );
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(ft(&p.b, "ft3")["state"], "stopped");
    assert_eq!(p.a.info("ft3")["qmp_status"], "running");
    let out = p.b.cli(&["vm", "info", "ft3"]);
    assert!(
        !out.status.success(),
        "the backup defined the VM after a clean unprotect"
    );
}

#[test]
fn a_guest_that_shuts_down_is_not_resurrected_on_the_backup() {
    let _g = serial_guard();
    let p = pair();
    boot_and_protect(&p, "ft4");
    // A graceful stop: ACPI power button, the guest powers off, QEMU exits
    // cleanly. Nothing failed, so nothing may take over.
    p.a.cli_ok(&["vm", "stop", "ft4"]);
    wait_ft(
        &p.b,
        "ft4",
        "backup told of the shutdown",
        Duration::from_secs(30),
        |s| s["state"] == "stopped",
    );
    assert_eq!(p.a.info("ft4")["state"], "shutoff");
    // Well past the takeover timeout (2.5 s).
    std::thread::sleep(Duration::from_secs(4));
    let b = ft(&p.b, "ft4");
    assert_eq!(b["state"], "stopped", "{b:#}");
    let out = p.b.cli(&["vm", "info", "ft4"]);
    assert!(
        !out.status.success(),
        "the backup started a VM its guest had shut down"
    );
}

#[test]
fn protect_refuses_bad_requests() {
    let _g = serial_guard();
    let d = Daemon::start();
    d.create_guest("idle", "");
    let out = d.cli(&["protect", "idle", "--backup", "nowhere"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an endpoint"));
    let out = d.cli(&[
        "protect",
        "idle",
        "--backup",
        "unix:/nonexistent/x.sock",
        "--epoch-ms",
        "5",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("epoch_ms"));
    let out = d.cli(&["protect", "idle", "--backup", "unix:/nonexistent/x.sock"]);
    assert!(!out.status.success(), "protecting a VM that is not running");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot protect"));
}

#[test]
fn backup_restart_mid_stream_resumes_protection() {
    let _g = serial_guard();
    let mut p = pair();
    boot_and_protect(&p, "ft4");
    let before = ft(&p.b, "ft4")["last_committed"].as_u64().unwrap();
    // Kill the backup daemon outright, mid-stream, and bring it back at
    // once (within the primary's fencing timeout).
    p.b.restart(libc::SIGKILL);
    let st = wait_ft(
        &p.a,
        "ft4",
        "protection again",
        Duration::from_secs(60),
        |s| s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) > before + 5,
    );
    assert_eq!(p.a.info("ft4")["qmp_status"], "running", "{st:#}");
    // The restarted backup recovered its replica and continued from it.
    let b = wait_ft(&p.b, "ft4", "standby again", Duration::from_secs(30), |s| {
        s["state"] == "standby"
    });
    assert!(b["last_committed"].as_u64().unwrap() > before, "{b:#}");
    // The new session's running copy sent only what the replica lacked
    // (the backup's digest of it), not all of RAM again.
    let log = p.a.log();
    let copy = log
        .lines()
        .rev()
        .find(|l| l.contains("initial copy sent"))
        .expect("no initial copy in the primary's log");
    let field = |k: &str| -> String {
        copy.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {k}= in {copy}"))
            .to_string()
    };
    eprintln!("primary after the backup's restart: {copy}");
    assert_eq!(field("digest"), "true", "{copy}");
    let (sent, of): (u64, u64) = (
        field("pages").parse().unwrap(),
        field("of").parse().unwrap(),
    );
    assert!(
        of > 0 && sent * 4 < of,
        "the resync after the restart sent {sent} of {of} pages: {copy}"
    );
    // Once the stream ends, no epoch is left half-applied.
    p.a.cli_ok(&["unprotect", "ft4"]);
    wait_ft(
        &p.b,
        "ft4",
        "backup stopped",
        Duration::from_secs(10),
        |s| s["state"] == "stopped",
    );
    let staging = p.b.state_dir.join("replicas/ft4/staging");
    assert_eq!(
        std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0),
        0
    );
}

/// The backup's last commit in the replica directory `dir`, as (epoch,
/// device-state length), `None` before the first. Read from the newer of
/// the two records in `commit-record` (4 KiB apart: magic `TDEMCMT2`, then
/// little-endian seq, epoch, device-state length, ...; the layout of
/// crates/replication/src/replica.rs; its checksum is not checked here).
fn replica_commit(dir: &std::path::Path) -> Option<(u64, u64)> {
    let b = std::fs::read(dir.join("commit-record")).ok()?;
    let u64_at = |r: &[u8], at: usize| u64::from_le_bytes(r[at..at + 8].try_into().unwrap());
    b.chunks(4096)
        .filter(|r| r.len() >= 44 && &r[..8] == b"TDEMCMT2")
        .map(|r| (u64_at(r, 8), u64_at(r, 16), u64_at(r, 24)))
        .max()
        .map(|(_seq, epoch, len)| (epoch, len))
}

/// A backup whose state lives on a tmpfs of `size`, and `vm` booted on
/// the primary and protected to it.
fn protect_to_a_backup_on_a_small_fs(size: &str, vm: &str) -> (Pair, SmallFs) {
    let fs = SmallFs::new(size);
    let p = pair_on(Some(fs.0.join("state")), &[]);
    p.a.create_guest(vm, "");
    p.a.cli_ok(&["vm", "start", vm]);
    p.a.wait_console(vm, READY, BOOT);
    p.a.cli_ok(&["protect", vm, "--backup", &p.endpoint]);
    (p, fs)
}

#[test]
fn backup_disk_full_degrades_protection_and_the_vm_keeps_running() {
    let _g = serial_guard();
    // Room for the replica (128 MiB of RAM and the 64 MiB disk, reserved
    // when it is opened) but not for the first epoch's journal.
    let (p, fs) = protect_to_a_backup_on_a_small_fs("224m", "full");
    let st = wait_ft(&p.a, "full", "degraded", Duration::from_secs(60), |s| {
        s["state"] == "degraded" && s["detail"].as_str().unwrap_or("").contains("No space left")
    });
    eprintln!("primary: {}", st["detail"]);
    // The backup answers but commits nothing: after the degrade timeout
    // (tandemd's default, 10 s) the primary has it disarm and stops holding
    // output, and says so (audit M12).
    let st = wait_ft(&p.a, "full", "unprotected", Duration::from_secs(60), |s| {
        let d = s["detail"].as_str().unwrap_or("");
        s["state"] == "degraded" && d.contains("unprotected") && d.contains("No space left")
    });
    eprintln!("primary: {}", st["detail"]);
    // Protection is degraded, the guest runs on, and nothing was half-applied.
    let n = *ticks(&p.a.console("full")).last().unwrap();
    p.a.wait_console(
        "full",
        &format!("tandem-guest: tick {}", n + 3),
        Duration::from_secs(30),
    );
    assert_eq!(p.a.info("full")["qmp_status"], "running", "{st:#}");
    let replica = p.b.state_dir.join("replicas/full");
    assert_eq!(
        replica_commit(&replica),
        None,
        "an epoch was committed on a full disk"
    );
    // The primary keeps retrying, so a journal being written (and removed
    // when it fails) may be there at any moment; what must never exist is a
    // ready marker, the commit point of a staged epoch.
    let ready: Vec<String> = std::fs::read_dir(replica.join("staging"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".ready"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        ready.is_empty(),
        "an epoch reached its commit point on a full disk: {ready:?}"
    );
    drop(p);
    drop(fs);
}

#[test]
fn a_backup_without_room_for_the_replica_refuses_it_and_says_why() {
    let _g = serial_guard();
    // Less than the replica's 128 MiB of RAM, which is reserved up front.
    let (p, fs) = protect_to_a_backup_on_a_small_fs("96m", "roomless");
    let st = wait_ft(&p.a, "roomless", "refused", Duration::from_secs(60), |s| {
        let d = s["detail"].as_str().unwrap_or("");
        s["state"] == "degraded"
            && d.contains("backup refused the replica")
            && d.contains("No space left")
    });
    // Nothing was ever sent that the backup could resume, so the guest is
    // not fenced: it runs on.
    let n = *ticks(&p.a.console("roomless")).last().unwrap();
    p.a.wait_console(
        "roomless",
        &format!("tandem-guest: tick {}", n + 3),
        Duration::from_secs(30),
    );
    assert_eq!(p.a.info("roomless")["qmp_status"], "running", "{st:#}");
    drop(p);
    drop(fs);
}

/// A backup that accepts the connection and then says nothing: before the
/// backup has been sent a consistent epoch it cannot take over, so the
/// primary must not fence (pause) its guest; protection is degraded and
/// the guest runs on. (It used to be paused after the fencing timeout.)
#[test]
fn a_backup_that_never_answers_does_not_pause_the_guest() {
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let _g = serial_guard();
    let link = tempfile::Builder::new()
        .prefix("tandem-ft-mute-")
        .tempdir()
        .unwrap();
    let sock = link.path().join("repl.sock");
    let listener = UnixListener::bind(&sock).expect("bind the mute backup");
    listener.set_nonblocking(true).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let mute = {
        let done = done.clone();
        std::thread::spawn(move || {
            // Holds every connection open without a byte of answer; bounded
            // by the test's own end and by a hard limit.
            let mut held = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(300);
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok((c, _)) = listener.accept() {
                    held.push(c);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            held.len()
        })
    };
    let a = Daemon::start();
    a.create_guest("mute", "");
    a.cli_ok(&["vm", "start", "mute"]);
    a.wait_console("mute", READY, BOOT);
    a.cli_ok(&[
        "protect",
        "mute",
        "--backup",
        &format!("unix:{}", sock.display()),
    ]);
    // Well past the fencing timeout (1.5 s by default).
    std::thread::sleep(Duration::from_secs(5));
    let st = ft(&a, "mute");
    assert_ne!(st["state"], "fenced", "{st:#}");
    assert_eq!(a.info("mute")["qmp_status"], "running", "{st:#}");
    let n = *ticks(&a.console("mute")).last().unwrap();
    a.wait_console(
        "mute",
        &format!("tandem-guest: tick {}", n + 2),
        Duration::from_secs(30),
    );
    a.cli_ok(&["unprotect", "mute"]);
    done.store(true, Ordering::SeqCst);
    assert!(mute.join().unwrap() >= 1, "the primary never connected");
}

/// A test's own QMP monitor on the guest's QEMU (tandemd holds the one in
/// the VM's spec): a second `-qmp` that a `--qemu` wrapper adds.
struct TestQmp {
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
    w: std::os::unix::net::UnixStream,
}

impl TestQmp {
    fn connect(path: &std::path::Path) -> TestQmp {
        let s = std::os::unix::net::UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut q = TestQmp {
            r: std::io::BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        q.line(); // the greeting
        q.call("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn line(&mut self) -> Value {
        use std::io::BufRead;
        let mut l = String::new();
        self.r.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP sent {l:?}: {e}"))
    }

    fn call(&mut self, cmd: &str, args: Value) -> Value {
        use std::io::Write;
        let msg = serde_json::json!({"execute": cmd, "arguments": args});
        writeln!(self.w, "{msg}").expect("QMP write");
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                continue;
            }
            return match v.get("return") {
                Some(r) => r.clone(),
                None => panic!("{cmd}: {v}"),
            };
        }
    }
}

/// Issue 13: a disk mirror that stops (here: cancelled through QMP, which
/// leaves the NBD connection up, so only QEMU knows) must not let an epoch
/// with device state commit without the disk's writes. Protection turns
/// degraded, naming the disk, and comes back by itself once tandemd has
/// restarted the mirror and the disk is copied again.
#[test]
fn a_cancelled_disk_mirror_degrades_protection_until_it_is_restarted() {
    use std::os::unix::fs::PermissionsExt;

    let _g = serial_guard();
    let tools = tempfile::Builder::new()
        .prefix("tandem-ft-mirror-")
        .tempdir()
        .expect("tempdir");
    let qmp_sock = tools.path().join("qmp.sock");
    let wrapper = tools.path().join("qemu");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec qemu-system-x86_64 \"$@\" -qmp unix:{},server=on,wait=off\n",
            qmp_sock.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let endpoint = format!("unix:{}", tools.path().join("repl.sock").display());
    let b = Daemon::start_with(&["--repl-listen", &endpoint]);
    let a = Daemon::start_with(&["--qemu", wrapper.to_str().unwrap()]);
    let vm = "ftdisk";
    a.create_guest(vm, ""); // with its data disk
    a.cli_ok(&["vm", "start", vm]);
    a.wait_console(vm, READY, BOOT);
    a.cli_ok(&["protect", vm, "--backup", &endpoint, "--epoch-ms", "50"]);
    wait_ft(&a, vm, "protection", Duration::from_secs(60), |s| {
        s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) >= 5
    });
    wait_ft(&b, vm, "backup standby", Duration::from_secs(10), |s| {
        s["state"] == "standby"
    });
    // (epoch, device_state_len) of the backup's last commit.
    let replica = b.state_dir.join(format!("replicas/{vm}"));
    let committed = || replica_commit(&replica).expect("a commit");
    assert!(committed().1 > 0, "protected without device state");

    let mut qmp = TestQmp::connect(&qmp_sock);
    let jobs = qmp.call("query-block-jobs", serde_json::json!({}));
    let job = jobs
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|j| j["device"].as_str().unwrap_or("").starts_with("ft-data-"))
        })
        .unwrap_or_else(|| panic!("no mirror job for disk data: {jobs}"))
        .clone();
    assert_eq!(job["status"], "ready", "{job}");
    let id = job["device"].as_str().unwrap().to_string();
    let generation: u32 = id["ft-data-".len()..].parse().expect("job generation");
    // Hold the restart's first two attempts off, so the mirror stays down
    // through their backoff (1 + 2 s): the node names they add are taken.
    for g in [generation + 1, generation + 2] {
        qmp.call(
            "blockdev-add",
            serde_json::json!({"driver": "null-co", "node-name": format!("ftm-data-{g}")}),
        );
    }
    // An operator's plain cancel: QEMU completes the job without pivoting
    // and stops mirroring; the NBD connection stays up.
    qmp.call("block-job-cancel", serde_json::json!({"device": id}));

    let st = wait_ft(&a, vm, "degraded", Duration::from_secs(10), |s| {
        s["state"] == "degraded" && s["detail"].as_str().unwrap_or("").contains("disk `data`")
    });
    eprintln!("after the cancel: {}", st["detail"]);
    // The check that failed ran in an epoch before this one; from it on,
    // no epoch may carry device state until the disk is copied again.
    let failed_by = ft(&a, vm)["open_epoch"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let stateless = loop {
        // The commit first, then the status: if the status still shows
        // the held-off restart, the commit was captured before any new job
        // could have finished copying.
        let (epoch, len) = committed();
        let s = ft(&a, vm);
        let held = s["state"] == "degraded"
            && s["detail"]
                .as_str()
                .unwrap_or("")
                .contains("restart attempt");
        if held && epoch >= failed_by {
            assert_eq!(
                len, 0,
                "epoch {epoch} committed with device state while disk data's mirror was down: {s:#}"
            );
            break epoch;
        }
        assert!(
            Instant::now() < deadline,
            "no commit from epoch {failed_by} on seen while the restart was held off: {s:#}\n{}",
            tandem_tests::tail(&a.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    // Protection comes back by itself: the third attempt restarts the
    // mirror, the disk is copied again, and epochs carry state again.
    let st = wait_ft(&a, vm, "protected again", Duration::from_secs(40), |s| {
        s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) > stateless
    });
    let (epoch, len) = committed();
    assert!(epoch > stateless && len > 0, "{epoch} {len}: {st:#}");
    wait_ft(
        &b,
        vm,
        "backup standby again",
        Duration::from_secs(10),
        |s| s["state"] == "standby",
    );
    let jobs = qmp.call("query-block-jobs", serde_json::json!({}));
    let new_id = format!("ft-data-{}", generation + 3);
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["device"] == new_id.as_str() && j["ready"] == true),
        "{jobs}"
    );
    let log = a.log();
    assert!(
        log.contains("restarting the disk's mirror failed")
            && log.contains("disk mirror restarted"),
        "{}",
        tandem_tests::tail(&log, 40)
    );
    assert_eq!(a.info(vm)["qmp_status"], "running");
    a.cli_ok(&["unprotect", vm]);
    // What the per-epoch check cost inside the guest's pauses.
    if let Some(l) = a.log().lines().rev().find(|l| l.contains("disk checks")) {
        eprintln!("{l}");
    }
}

/// Where the backup keeps `vm`'s replica.
fn replica_dir(b: &Daemon, vm: &str) -> std::path::PathBuf {
    b.state_dir.join("replicas").join(vm)
}

/// A digest of `bytes`: std's SipHash with fixed keys (optimised code even
/// in this unoptimised test binary), enough to tell two copies apart.
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// The first `len` bytes of `path`, holes and anything past its end read
/// as zeros (a replica's RAM file may be shorter, or sparse).
fn read_padded(path: &std::path::Path, len: usize) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    b.resize(len, 0);
    b
}

/// Every file under `dir` (recursively) as (relative path, length, mtime,
/// inode, content digest): a write, a truncation, a rename over it or a
/// new or removed file all change it.
fn fingerprint(dir: &std::path::Path) -> Vec<(String, u64, std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        // While a session applies epochs, journals come and go under the
        // listing: a file that is gone by the time it is looked at is not
        // in the fingerprint (a quiescent replica has none such).
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != dir => continue,
            Err(e) => panic!("{}: {e}", d.display()),
        };
        for e in entries {
            let Ok(e) = e else { continue };
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                todo.push(e.path());
                continue;
            }
            let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            out.push((rel, m.len(), m.modified().unwrap(), m.ino(), digest(&bytes)));
        }
    }
    out.sort();
    out
}

/// An inotify watch on a replica directory and its subdirectories, for
/// every change a writer can make: opening a file for writing shows as
/// `IN_CLOSE_WRITE` once it is closed, even if nothing was written.
struct ReplicaWatch {
    fd: std::os::fd::OwnedFd,
    dirs: Vec<(i32, std::path::PathBuf)>,
}

impl ReplicaWatch {
    const MASK: u32 = libc::IN_MODIFY
        | libc::IN_ATTRIB
        | libc::IN_CLOSE_WRITE
        | libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_MOVED_FROM
        | libc::IN_MOVED_TO
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF;

    fn new(dir: &std::path::Path) -> ReplicaWatch {
        use std::os::fd::{AsRawFd, FromRawFd};
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: inotify_init1 returns a new descriptor (or -1) that
        // becomes ours alone.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            raw >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(
            std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
        let dirs = dirs
            .into_iter()
            .map(|d| {
                let c = std::ffi::CString::new(d.as_os_str().as_bytes()).unwrap();
                // SAFETY: a valid descriptor and a NUL-terminated path.
                let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), Self::MASK) };
                assert!(
                    wd >= 0,
                    "watching {}: {}",
                    d.display(),
                    std::io::Error::last_os_error()
                );
                (wd, d)
            })
            .collect();
        ReplicaWatch { fd, dirs }
    }

    /// The changes since the last call, as "path: mask" (non-blocking).
    fn events(&self) -> Vec<(String, u32)> {
        use std::os::fd::AsRawFd;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: reads into a buffer we own, of the length given.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock,
                    "inotify read: {e}"
                );
                return out;
            }
            let mut at = 0;
            while at + 16 <= n as usize {
                let word =
                    |o: usize| u32::from_ne_bytes(buf[at + o..at + o + 4].try_into().unwrap());
                let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
                let name = String::from_utf8_lossy(&buf[at + 16..at + 16 + len]);
                let name = name.trim_end_matches('\0');
                assert_eq!(
                    mask & libc::IN_Q_OVERFLOW,
                    0,
                    "inotify queue overflowed: changes were lost"
                );
                let dir = self
                    .dirs
                    .iter()
                    .find(|(w, _)| *w == wd)
                    .map(|(_, d)| d.display().to_string())
                    .unwrap_or_default();
                out.push((format!("{dir}/{name}"), mask));
                at += 16 + len;
            }
        }
    }
}

/// The descriptors of process `pid` open for writing on files under
/// `dir`, as "fd -> path (flags)".
fn write_fds_under(pid: u32, dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in fds.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target.starts_with(dir) {
            continue;
        }
        let fd = e.file_name().to_string_lossy().into_owned();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| i32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            out.push(format!("{fd} -> {} (flags {flags:o})", target.display()));
        }
    }
    out.sort();
    out
}

/// How many hellos carrying `uuid` the backup `b` has refused so far.
fn refusals(b: &Daemon, uuid: &str) -> usize {
    b.log()
        .lines()
        .filter(|l| l.contains("refusing replica") && l.contains(uuid))
        .count()
}

/// Issue 13, end to end: host A protects `web` to backup B; host C, with a
/// different VM that is also called `web` (its own UUID, given at create
/// time), protects it to the same B. C is refused, naming both VMs, while
/// A stays protected; the refused hellos open none of the replica's files
/// for writing; and once A's paused guest's last epoch is committed, the
/// replica's RAM and disk equal the primary's, byte for byte.
///
/// Two phases of refusal, because of what stands in C's way in each:
/// - while A's session is live, a hello of another instance would be
///   refused as a second primary even without the identity check; what
///   proves the identity check here is the reason C is given ("belongs to
///   VM <A's UUID>, not to this primary's VM <C's UUID>"; without the check
///   C is told "another primary for `web` is connected and alive" and the
///   wait for the identity refusal fails);
/// - once A has ended protection (bye confirmed, no live session), the
///   identity check is the only guard: C's VM has the same shape, so
///   without the check C's hello would be admitted, `prepare_replica`
///   would record C's identity and hello, and C's running copy would write
///   C's RAM into `ram`. The inotify watch, the before/after fingerprint of
///   every replica file, the wait for further refusals and the final RAM
///   digest each fail then (the crate-level twin that switches the check
///   off through `fault-injection` is
///   `backup_protocol::without_the_identity_check_the_same_name_test_sees_the_damage`).
#[test]
fn a_same_name_vm_from_another_host_is_refused_and_the_replica_stays_the_first_vms() {
    let _g = serial_guard();
    let t0 = Instant::now();
    let vm = "web";
    let p = pair();
    // The first VM, with its data disk (replicated through the NBD mirror).
    p.a.create_guest(vm, "");
    p.a.cli_ok(&["vm", "start", vm]);
    p.a.wait_console(vm, READY, BOOT);
    p.a.cli_ok(&["protect", vm, "--backup", &p.endpoint, "--epoch-ms", "50"]);
    wait_ft(&p.a, vm, "protection", Duration::from_secs(60), |s| {
        s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) >= 5
    });
    wait_ft(&p.b, vm, "backup standby", Duration::from_secs(10), |s| {
        s["state"] == "standby"
    });
    let a_uuid = p.a.info(vm)["uuid"].as_str().expect("uuid").to_string();
    let replica = replica_dir(&p.b, vm);
    let identity: Value =
        serde_json::from_slice(&std::fs::read(replica.join("identity.json")).unwrap()).unwrap();
    assert_eq!(identity["uuid"], a_uuid.as_str(), "{identity}");

    // Host C: its own VM called `web`, created there, so another UUID.
    let c = Daemon::start();
    c.create_guest(vm, "");
    c.cli_ok(&["vm", "start", vm]);
    let c_uuid = c.info(vm)["uuid"].as_str().expect("uuid").to_string();
    assert!(
        !c_uuid.is_empty() && c_uuid != a_uuid,
        "{a_uuid} / {c_uuid}"
    );
    let why = format!("belongs to VM {a_uuid}, not to this primary's VM {c_uuid}");
    let c_refused = |s: &Value| {
        s["state"] == "degraded"
            && s["detail"]
                .as_str()
                .is_some_and(|d| d.contains("backup refused the replica") && d.contains(&why))
    };

    // Phase 1: C says hello again and again while A streams its epochs.
    // A's session writes RAM, slots and commit records all the time; the
    // files only a hello writes are its identity and hello.
    let hello_files = ["identity.json", "hello.json"];
    let only = |fp: Vec<(String, u64, std::time::SystemTime, u64, u64)>| {
        fp.into_iter()
            .filter(|f| hello_files.contains(&f.0.as_str()))
            .collect::<Vec<_>>()
    };
    let watch = ReplicaWatch::new(&replica);
    let hellos_before = only(fingerprint(&replica));
    assert_eq!(hellos_before.len(), 2, "{hellos_before:?}");
    let a_committed = ft(&p.a, vm)["last_committed"].as_u64().unwrap();
    let degraded = |d: &Daemon| d.log().matches("protection degraded").count();
    let a_degraded = degraded(&p.a);
    c.cli_ok(&["protect", vm, "--backup", &p.endpoint, "--epoch-ms", "50"]);
    let mut hello_writes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let c_st = loop {
        // A is never superseded, degraded or resynced by C's attempts.
        let a = ft(&p.a, vm);
        assert_eq!(a["state"], "protected", "while C was refused: {a:#}");
        hello_writes.extend(
            watch
                .events()
                .into_iter()
                .filter(|(path, _)| hello_files.iter().any(|f| path.ends_with(f))),
        );
        let s = ft(&c, vm);
        if c_refused(&s) && refusals(&p.b, &c_uuid) >= 3 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "C not refused as another VM three times: {s:#}\nbackup log:\n{}",
            tandem_tests::tail(&p.b.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("C while A is live: {}", c_st["detail"]);
    let a = ft(&p.a, vm);
    assert_eq!(a["state"], "protected", "{a:#}");
    assert!(
        a["last_committed"].as_u64().unwrap() > a_committed,
        "A's epochs stopped committing: {a:#}"
    );
    assert_eq!(
        degraded(&p.a),
        a_degraded,
        "A's session was disturbed:\n{}",
        tandem_tests::tail(&p.a.log(), 30)
    );
    let b = ft(&p.b, vm);
    assert_eq!(b["state"], "standby", "{b:#}");
    assert!(hello_writes.is_empty(), "{hello_writes:?}");
    assert_eq!(only(fingerprint(&replica)), hellos_before);
    drop(watch);

    // Pause A's guest and let an epoch that captured it paused commit:
    // every epoch from `open_epoch` on starts after the pause. A paused
    // guest stays protected (its replica resumable) however long it stays
    // paused: watched for 4 s, 80 epoch periods, and longer than a failing
    // checkpoint takes to surface (about 2 s, see below).
    p.a.cli_ok(&["vm", "pause", vm]);
    let stopped = |info: &Value| {
        // A checkpoint of a paused guest is a migration of a stopped VM,
        // after which QEMU says `postmigrate`: stopped all the same.
        info["state"] == "paused"
            && (info["qmp_status"] == "paused" || info["qmp_status"] == "postmigrate")
    };
    let info = p.a.info(vm);
    assert!(stopped(&info), "{info:#}");
    let paused_at = Instant::now();
    let open = ft(&p.a, vm)["open_epoch"].as_u64().unwrap();
    let a_last = loop {
        let s = ft(&p.a, vm);
        // Seen 2026-12-05 (QEMU 10.0): the first checkpoint after the pause
        // leaves QEMU in `postmigrate`, the next `migrate` is refused
        // ("Can't migrate the vm that was paused due to previous
        // migration"), and protection loops through degraded and a fresh
        // running copy every ~2.5 s, each committed without device state:
        // the replica of a paused VM is not resumable.
        assert_eq!(
            s["state"],
            "protected",
            "pausing the protected VM broke its protection: {s:#}\n{}",
            tandem_tests::tail(&p.a.log(), 20)
        );
        let committed = s["last_committed"].as_u64().unwrap_or(0);
        if committed >= open && paused_at.elapsed() >= Duration::from_secs(4) {
            break s;
        }
        assert!(
            paused_at.elapsed() < Duration::from_secs(30),
            "no commit of epoch {open} (after the pause) within 30 s: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        degraded(&p.a),
        a_degraded,
        "{}",
        tandem_tests::tail(&p.a.log(), 20)
    );
    eprintln!(
        "A paused at open epoch {open}; committed {}, last epoch dirtied {} pages",
        a_last["last_committed"], a_last["dirty_pages_last"]
    );
    // End protection: the backup applies every epoch sent before the bye
    // and then confirms it, and from then on nothing writes the replica (a
    // paused guest is otherwise still checkpointed every epoch).
    p.a.cli_ok(&["unprotect", vm]);
    let b = wait_ft(&p.b, vm, "backup stopped", Duration::from_secs(10), |s| {
        s["state"] == "stopped"
    });
    let (last, len) = replica_commit(&replica).expect("a commit");
    assert!(len > 0, "the last commit carries no device state");
    assert_eq!(b["last_committed"].as_u64(), Some(last), "{b:#}");
    assert!(
        last >= a_last["last_committed"].as_u64().unwrap(),
        "replica at {last}, A had {a_last:#}"
    );

    // Phase 2: nothing writes the replica now. C's hellos go on (it
    // retries every heartbeat); each is refused and must leave every file
    // as it is, and open none for writing.
    let watch = ReplicaWatch::new(&replica);
    let files_before = fingerprint(&replica);
    let fds_before = write_fds_under(p.b.pid(), &replica);
    let seen = refusals(&p.b, &c_uuid);
    let deadline = Instant::now() + Duration::from_secs(30);
    while refusals(&p.b, &c_uuid) < seen + 3 {
        assert!(
            Instant::now() < deadline,
            "C's hellos stopped being refused after A's bye: {:#}\nbackup log:\n{}",
            ft(&c, vm),
            tandem_tests::tail(&p.b.log(), 30)
        );
        assert_eq!(write_fds_under(p.b.pid(), &replica), fds_before);
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = ft(&c, vm);
    assert!(c_refused(&s), "{s:#}");
    let changes = watch.events();
    assert!(
        changes.is_empty(),
        "refused hellos changed the replica: {changes:?}"
    );
    assert_eq!(fingerprint(&replica), files_before);
    assert_eq!(write_fds_under(p.b.pid(), &replica), fds_before);
    eprintln!(
        "backup's write descriptors on the replica after bye: {fds_before:?}; refusals of C: {}",
        refusals(&p.b, &c_uuid)
    );
    assert_eq!(replica_commit(&replica), Some((last, len)));

    // The replica, as last committed, against the paused primary.
    let info = p.a.info(vm);
    assert!(stopped(&info), "{info:#}");
    let ram_size = (info["spec_toml"]
        .as_str()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("memory_mib = "))
                .and_then(|m| m.trim().parse::<usize>().ok())
        })
        .expect("memory_mib in the spec"))
        << 20;
    let primary_ram = read_padded(
        std::path::Path::new(info["ram_file"].as_str().expect("ram_file")),
        ram_size,
    );
    let replica_ram = read_padded(&replica.join("ram"), ram_size);
    let differing: Vec<usize> = primary_ram
        .chunks(4096)
        .zip(replica_ram.chunks(4096))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert!(
        differing.is_empty(),
        "replica RAM (epoch {last}) differs from the paused primary's in {} of {} pages, first {:?}; digests {:016x} / {:016x}",
        differing.len(),
        ram_size / 4096,
        &differing[..differing.len().min(16)],
        digest(&primary_ram),
        digest(&replica_ram)
    );
    eprintln!(
        "RAM: {ram_size} bytes, digest {:016x} on both (epoch {last})",
        digest(&primary_ram)
    );
    drop((primary_ram, replica_ram));

    // The disk: the primary's qcow2 as the guest sees it (QEMU flushed it
    // when the guest was paused; -U as QEMU still holds it).
    let qcow2 = p.a.dir.path().join(format!("{vm}-data.qcow2"));
    let raw = p.a.dir.path().join(format!("{vm}-data.raw"));
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow2)
        .arg(&raw)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let primary_disk = std::fs::read(&raw).unwrap();
    let replica_disk = read_padded(&replica.join("disk-data.raw"), primary_disk.len());
    let differing = primary_disk
        .chunks(4096)
        .zip(replica_disk.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing,
        0,
        "replica disk `data` differs in {differing} blocks; digests {:016x} / {:016x}",
        digest(&primary_disk),
        digest(&replica_disk)
    );
    eprintln!(
        "disk data: {} bytes, digest {:016x} on both; test took {:?}",
        primary_disk.len(),
        digest(&primary_disk),
        t0.elapsed()
    );
}

/// A standalone pair (`tandem cluster init --standalone`): the backup's TCP
/// listener speaks mutual TLS and admits the peers its list names; the
/// primary protects to the backup by its certificate name and refuses to
/// protect to a bare address, or to a backup that answers under another
/// name. Replication then runs as usual (to `protected`).
#[test]
fn a_standalone_pair_replicates_over_mutual_tls() {
    let _g = serial_guard();
    let certs = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let a0 = Daemon::start();
    a0.cli_ok(&[
        "cluster",
        "init",
        "--standalone",
        "host-a",
        "host-b",
        "--state-dir",
        certs.path().to_str().unwrap(),
    ]);
    let id = |h: &str| certs.path().join("hosts").join(h);
    let peers = certs.path().join("peers.toml");
    std::fs::write(&peers, "[[peer]]\nname = \"host-a\"\nvms = [\"*\"]\n").unwrap();
    drop(a0);
    let b = Daemon::start_with(&[
        "--repl-listen",
        &listen,
        "--identity-dir",
        id("host-b").to_str().unwrap(),
        "--repl-peers",
        peers.to_str().unwrap(),
    ]);
    let a = Daemon::start_with(&["--identity-dir", id("host-a").to_str().unwrap()]);
    a.create_guest("tls", "");
    a.cli_ok(&["vm", "start", "tls"]);
    a.wait_console("tls", READY, BOOT);

    // A bare address cannot be checked: refused, with the way out.
    let out = a.cli(&["protect", "tls", "--backup", &listen]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("NAME@{listen}")),
        "{err}"
    );
    // The host at that address is not `host-c`: the handshake fails and
    // protection says so (degraded; nothing resumable was sent, so the
    // guest runs on).
    a.cli_ok(&["protect", "tls", "--backup", &format!("host-c@{listen}")]);
    let st = wait_ft(
        &a,
        "tls",
        "a refused backup name",
        Duration::from_secs(30),
        |s| {
            s["state"] == "degraded"
                && s["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("TLS with host-c")
        },
    );
    eprintln!("wrong name: {}", st["detail"]);
    a.cli_ok(&["unprotect", "tls"]);

    a.cli_ok(&["protect", "tls", "--backup", &format!("host-b@{listen}")]);
    wait_ft(
        &a,
        "tls",
        "protected over TLS",
        Duration::from_secs(60),
        |s| s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) >= 3,
    );
    wait_ft(&b, "tls", "backup standby", Duration::from_secs(10), |s| {
        s["state"] == "standby"
    });
    assert!(
        b.log().contains("host-a (host,"),
        "the backup knows its primary by its certificate:\n{}",
        b.log()
    );
    a.cli_ok(&["unprotect", "tls"]);
}

/// Issue 18: a protected VM migrates with its protection. Checkpoints are
/// held while QEMU migrates (output with them), the destination protects
/// the VM to the same backup one generation up, which supersedes the
/// source and resyncs by digest, and only after the destination's first
/// commit does the source let go. A later failover resumes the VM on the
/// backup from the destination's commits, not the source's.
#[test]
fn a_protected_vm_migrates_with_its_protection_and_fails_over_later() {
    let _g = serial_guard();
    let p = pair();
    let c = Daemon::start();
    let protected_at = boot_and_protect(&p, "ftm");

    // A migration that does not move the VM (cancelled at 1 MiB/s):
    // checkpoints are held while it runs, and go on after it.
    let child = std::process::Command::new(tandem_tests::bin("tandem"))
        .arg("--socket")
        .arg(&p.a.socket)
        .args(["migrate", "ftm", "--bandwidth", "1", "--to-socket"])
        .arg(&c.socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let held = wait_ft(
        &p.a,
        "ftm",
        "checkpoints held",
        Duration::from_secs(30),
        |s| {
            s["detail"]
                .as_str()
                .unwrap_or("")
                .contains("held for a live migration")
        },
    );
    let held_at = held["last_committed"].as_u64().unwrap();
    // The guest runs on meanwhile (two more ticks), and nothing commits.
    let tick = *ticks(&p.a.console("ftm")).last().unwrap();
    p.a.wait_console(
        "ftm",
        &format!("tandem-guest: tick {}", tick + 2),
        Duration::from_secs(30),
    );
    let still = ft(&p.a, "ftm");
    assert_eq!(still["last_committed"].as_u64(), Some(held_at), "{still:#}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.a.cli(&["migrate", "ftm", "--cancel"]).status.success() {
        assert!(Instant::now() < deadline, "never cancellable");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("was cancelled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_ft(
        &p.a,
        "ftm",
        "checkpoints again",
        Duration::from_secs(30),
        |s| s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) >= held_at + 5,
    );
    assert!(c.qemu_processes().is_empty(), "the destination kept a QEMU");
    let before = *ticks(&p.a.console("ftm")).last().unwrap();

    let out = p.a.cli_ok(&[
        "--json",
        "migrate",
        "ftm",
        "--to-socket",
        c.socket.to_str().unwrap(),
    ]);
    let report: Value = serde_json::from_str(out.lines().last().expect("a report")).unwrap();
    assert_eq!(report["phase"], "done", "{report:#}");
    assert!(report["first_commit_ms"].as_u64().is_some(), "{report:#}");
    eprintln!("migration report: {report}");
    // The source's copy and its protection are gone.
    assert!(p.a.qemu_processes().is_empty());
    assert!(!p.a.cli(&["vm", "info", "ftm"]).status.success());
    // The destination runs it, protected to the same backup, a
    // generation up, and the backup stands by with the destination's
    // replica.
    assert_eq!(c.info("ftm")["state"], "running");
    let st = wait_ft(
        &c,
        "ftm",
        "protection on the destination",
        Duration::from_secs(30),
        |s| s["role"] == "primary" && s["state"] == "protected",
    );
    assert_eq!(st["peer"].as_str(), Some(p.endpoint.as_str()), "{st:#}");
    wait_ft(
        &p.b,
        "ftm",
        "backup standby",
        Duration::from_secs(10),
        |s| s["state"] == "standby",
    );
    let generation = std::fs::read_to_string(c.state_dir.join("ft/ftm/generation"))
        .expect("the destination records its generation");
    assert_eq!(generation.trim(), "1", "the source protected under 0");
    // The guest went on: no reboot, its counter past where the source was.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(t) = ticks(&c.console("ftm")).first() {
            break *t;
        }
        assert!(Instant::now() < deadline, "the migrated guest never ticked");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !c.console("ftm").contains(READY),
        "the destination rebooted the guest"
    );
    assert!(
        first > before,
        "resumed at {first}, the source had reached {before}"
    );
    c.wait_console(
        "ftm",
        &format!("tandem-guest: tick {}", first + 3),
        Duration::from_secs(30),
    );

    // A later failover resumes it on the backup from the destination's
    // commits.
    let at_kill = *ticks(&c.console("ftm")).last().unwrap();
    let pid = c.info("ftm")["pid"].as_u64().expect("pid") as i32;
    // SAFETY: kill(2) of the QEMU this test's daemon started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_ft(&p.b, "ftm", "takeover", Duration::from_secs(30), |s| {
        s["state"] == "failed-over"
    });
    assert_eq!(p.b.info("ftm")["state"], "running");
    let deadline = Instant::now() + Duration::from_secs(30);
    let resumed = loop {
        if let Some(t) = ticks(&p.b.console("ftm")).first() {
            break *t;
        }
        assert!(Instant::now() < deadline, "the resumed guest never ticked");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !p.b.console("ftm").contains(READY),
        "the backup rebooted the guest"
    );
    assert!(
        resumed >= first && resumed <= at_kill + 1 && resumed > protected_at,
        "resumed at {resumed}: the destination ran {first}..{at_kill}"
    );
    // The source never came back.
    assert!(p.a.qemu_processes().is_empty());
}
