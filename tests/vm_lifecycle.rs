//! VM lifecycle through tandemd and the CLI, with real TCG guests.

use std::time::Duration;

use tandem_tests::{pid_alive, serial_guard, ticks, Daemon, READY};

const BOOT: Duration = Duration::from_secs(90);

#[test]
fn boot_pause_resume_and_graceful_stop() {
    let _g = serial_guard();
    let d = Daemon::start();
    d.create_guest("life", "");
    d.cli_ok(&["vm", "start", "life"]);
    d.wait_console("life", READY, BOOT);
    d.wait_console("life", "tandem-guest: tick 3", BOOT);

    let info = d.info("life");
    assert_eq!(info["state"], "running");
    assert_eq!(info["qmp_status"], "running");
    assert_eq!(info["accel"], "tcg");
    let pid = info["pid"].as_u64().expect("pid") as u32;

    let paused = d.cli_json(&["vm", "pause", "life"]);
    assert_eq!(paused["state"], "paused");
    assert_eq!(paused["qmp_status"], "paused");
    // Let any line already in flight reach the log, then take the count.
    std::thread::sleep(Duration::from_millis(500));
    let before = ticks(&d.console("life"));
    let last = *before.last().expect("ticks before pause");
    // The guest ticks every 200 ms; 3 s paused would be ~15 ticks if it ran.
    std::thread::sleep(Duration::from_secs(3));
    let during = ticks(&d.console("life"));
    assert_eq!(during, before, "the guest printed ticks while paused");

    let resumed = d.cli_json(&["vm", "resume", "life"]);
    assert_eq!(resumed["state"], "running");
    d.wait_console(
        "life",
        &format!("tandem-guest: tick {}", last + 2),
        Duration::from_secs(30),
    );
    let after = ticks(&d.console("life"));
    // The counter continues from where it stopped: nothing ran, nothing skipped.
    let pos = after
        .iter()
        .position(|t| *t == last)
        .expect("last tick still in log");
    assert_eq!(
        after[pos + 1],
        last + 1,
        "counter after resume: {:?}",
        &after[pos..]
    );

    let stopped = d.cli_json(&["vm", "stop", "life"]);
    assert_eq!(stopped["state"], "shutoff", "{stopped:#}");
    let exit = &stopped["last_exit"];
    assert_eq!(exit["code"], 0, "{exit:#}");
    assert!(exit["signal"].is_null(), "{exit:#}");
    assert!(
        d.console("life").contains("tandem-guest: powering off"),
        "the guest did not see the ACPI power button"
    );
    assert!(!pid_alive(pid), "QEMU {pid} still runs after stop");
    assert!(d.qemu_processes().is_empty());

    // A stopped VM starts again.
    d.cli_ok(&["vm", "start", "life"]);
    d.wait_console("life", READY, BOOT);
    d.cli_ok(&["vm", "destroy", "life"]);
    assert!(d.qemu_processes().is_empty());
    assert_eq!(d.cli_json(&["vm", "list"]), serde_json::json!([]));
}

#[test]
fn daemon_restart_reattaches_to_running_vm() {
    let _g = serial_guard();
    let mut d = Daemon::start();
    d.create_guest("keep", "");
    d.cli_ok(&["vm", "start", "keep"]);
    d.wait_console("keep", READY, BOOT);
    let pid = d.info("keep")["pid"].as_u64().unwrap() as u32;

    // The harshest restart: SIGKILL, so tandemd gets no chance to tidy up.
    d.restart(libc::SIGKILL);
    assert!(pid_alive(pid), "killing tandemd killed the VM");
    let list = d.cli_json(&["vm", "list"]);
    assert_eq!(list[0]["name"], "keep");
    assert_eq!(list[0]["state"], "running");
    assert_eq!(list[0]["pid"], pid);
    assert_eq!(d.info("keep")["qmp_status"], "running");

    // Re-attached for real: the guest still runs and can be driven.
    let n = ticks(&d.console("keep")).last().copied().unwrap_or(0);
    d.wait_console(
        "keep",
        &format!("tandem-guest: tick {}", n + 2),
        Duration::from_secs(30),
    );
    assert_eq!(d.cli_json(&["vm", "pause", "keep"])["qmp_status"], "paused");
    // A graceful restart (SIGTERM) keeps the paused state too.
    d.restart(libc::SIGTERM);
    assert_eq!(d.info("keep")["state"], "paused");
    let stopped = d.cli_json(&["vm", "stop", "keep"]);
    assert_eq!(stopped["state"], "shutoff", "{stopped:#}");
    assert!(!pid_alive(pid));
}

#[test]
fn qemu_killed_from_outside_is_crashed_with_status() {
    let _g = serial_guard();
    let d = Daemon::start();
    d.create_guest("victim", "");
    d.cli_ok(&["vm", "start", "victim"]);
    d.wait_console("victim", READY, BOOT);
    let pid = d.info("victim")["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) of the QEMU this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let info = d
        .wait_info("victim", Duration::from_secs(20), |v| {
            v["state"] == "crashed"
        })
        .expect("VM never showed crashed");
    let exit = &info["last_exit"];
    assert_eq!(exit["signal"], 9, "{exit:#}");
    assert!(
        exit["reason"].as_str().unwrap().contains("signal 9"),
        "{exit:#}"
    );
    assert!(
        exit["serial_tail"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("tandem-guest")),
        "{exit:#}"
    );
    // A crashed VM can be started again.
    d.cli_ok(&["vm", "start", "victim"]);
    d.wait_console("victim", READY, BOOT);
}

#[test]
fn crash_while_tandemd_is_down_is_recorded() {
    let _g = serial_guard();
    let mut d = Daemon::start();
    d.create_guest("lonely", "");
    d.cli_ok(&["vm", "start", "lonely"]);
    d.wait_console("lonely", READY, BOOT);
    let pid = d.info("lonely")["pid"].as_u64().unwrap() as i32;
    d.kill(libc::SIGKILL);
    // SAFETY: kill(2) of the QEMU this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    d.restart(libc::SIGTERM);
    let info = d.info("lonely");
    assert_eq!(info["state"], "crashed", "{info:#}");
    assert_eq!(info["last_exit"]["signal"], 9, "{info:#}");
}

#[test]
fn qemu_start_failure_is_reported_and_leaves_nothing() {
    let _g = serial_guard();
    let d = Daemon::start();
    let spec = d.create_guest("broken", "");
    // Replace the data disk with garbage: QEMU refuses to open it.
    let text = std::fs::read_to_string(&spec).unwrap();
    let disk = text
        .lines()
        .find_map(|l| l.strip_prefix("path = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    std::fs::write(&disk, b"this is not a qcow2 image").unwrap();
    let out = d.cli(&["vm", "start", "broken"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed to start") && err.contains("qcow2"),
        "{err}"
    );
    assert!(d.qemu_processes().is_empty());
    let info = d.info("broken");
    assert!(
        !info["state"].as_str().unwrap().starts_with("run"),
        "{info:#}"
    );
}
