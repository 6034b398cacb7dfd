//! Device-state checkpoints: a running guest is checkpointed (RAM file copy
//! plus the x-ignore-shared device stream), keeps running, is killed, and a
//! fresh QEMU restored from the checkpoint continues from the checkpoint's
//! instant — proven by the guest's own tick counter.

use std::time::Duration;

use tandem_tests::{serial_guard, ticks, Daemon, READY};

const BOOT: Duration = Duration::from_secs(90);

#[test]
fn restored_guest_continues_from_the_checkpoint() {
    let _g = serial_guard();
    let d = Daemon::start();
    d.create_guest("ck", "");
    d.cli_ok(&["vm", "start", "ck"]);
    d.wait_console("ck", READY, BOOT);
    d.wait_console("ck", "tandem-guest: tick 5", BOOT);

    let before = *ticks(&d.console("ck")).last().expect("ticks");
    // A relative directory is taken under the daemon's checkpoint root.
    let dir = d.state_dir.join("checkpoints").join("ck-checkpoint");
    let report = d.cli_json(&["vm", "checkpoint", "ck", "ck-checkpoint"]);
    assert_eq!(report["dir"], dir.to_str().unwrap(), "{report:#}");
    let after = *ticks(&d.console("ck")).last().expect("ticks");
    assert_eq!(report["ram_bytes"], 128 * 1024 * 1024, "{report:#}");
    let dev = report["device_state_bytes"].as_u64().unwrap();
    assert!(dev > 0 && dev < 16 << 20, "device state size {dev}");
    assert_eq!(
        d.info("ck")["qmp_status"],
        "running",
        "checkpoint must resume the guest"
    );

    // The original runs on well past the checkpoint, then dies.
    d.wait_console(
        "ck",
        &format!("tandem-guest: tick {}", after + 10),
        Duration::from_secs(60),
    );
    d.cli_ok(&["vm", "stop", "ck", "--force"]);

    let restored = d.cli_json(&["vm", "restore", "ck", dir.to_str().unwrap()]);
    assert_eq!(restored["state"], "running", "{restored:#}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(t) = ticks(&d.console("ck")).first() {
            break *t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "restored guest never ticked"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = d.console("ck");
    assert!(
        !console.contains(READY),
        "the restored guest booted afresh instead of resuming:\n{console}"
    );
    assert!(
        first > before && first <= after + 1,
        "restored counter starts at {first}; checkpoint was taken between ticks {before} and {after}"
    );
    d.wait_console(
        "ck",
        &format!("tandem-guest: tick {}", first + 3),
        Duration::from_secs(30),
    );

    // Its devices came back whole: the ACPI power button still works.
    let stopped = d.cli_json(&["vm", "stop", "ck"]);
    assert_eq!(stopped["state"], "shutoff", "{stopped:#}");
    assert!(d.console("ck").contains("tandem-guest: powering off"));

    // The checkpoint was copied, not consumed: it restores a second time.
    let again = d.cli_json(&["vm", "restore", "ck", dir.to_str().unwrap()]);
    assert_eq!(again["state"], "running");
    d.cli_ok(&["vm", "destroy", "ck"]);
    assert!(d.qemu_processes().is_empty());
}

#[test]
fn checkpoint_and_restore_refuse_bad_requests() {
    let _g = serial_guard();
    let d = Daemon::start();
    d.create_guest("idle", "");
    let dir = d.state_dir.join("checkpoints").join("nope");
    let out = d.cli(&["vm", "checkpoint", "idle", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot checkpoint"), "{err}");
    assert!(!dir.exists(), "a refused checkpoint left {}", dir.display());

    let out = d.cli(&["vm", "restore", "idle", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checkpoint"), "{err}");
    assert_eq!(d.info("idle")["state"], "defined");
    assert!(d.qemu_processes().is_empty());
}
