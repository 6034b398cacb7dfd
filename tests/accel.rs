//! The `auto` accelerator decision on this host.

use std::time::{Duration, Instant};

use tandem_supervisor::accel::{probe_boot, static_verdict, HostVirtFacts, ProbeConfig};
use tandem_tests::{image_dir, serial_guard, Daemon, READY};

/// On a PVM host (`kvm_pvm`) `auto` must pick TCG, within the probe bound,
/// and a VM with `accelerator = "auto"` must boot under it.
#[test]
fn auto_picks_a_working_accelerator_within_its_bound() {
    let _g = serial_guard();
    let bound_ms = 8000u64;
    let d = Daemon::start_with(&["--accel-probe-timeout-ms", &bound_ms.to_string()]);
    let t = Instant::now();
    let host = d.cli_json(&["host", "info"]);
    let took = t.elapsed();
    let facts = HostVirtFacts::read();
    let accel = &host["accel"];
    assert_eq!(accel["probe_timeout_ms"], bound_ms);
    if facts.kvm_modules.iter().any(|m| m == "kvm_pvm") || !facts.cpu_virt_flag {
        assert_eq!(accel["chosen"], "tcg", "{accel:#}");
    }
    // The decision is bounded by the probe (plus process start slack).
    assert!(
        took < Duration::from_millis(bound_ms) + Duration::from_secs(10),
        "took {took:?}"
    );
    // Cached: asking again does not probe again.
    let again = d.cli_json(&["host", "info"]);
    assert_eq!(again["accel"]["probed_at"], accel["probed_at"]);

    let spec = d.dir.path().join("auto.toml");
    let text = d
        .guest_spec("auto", "")
        .replace("accelerator = \"tcg\"", "accelerator = \"auto\"");
    std::fs::write(&spec, text).unwrap();
    d.cli_ok(&["vm", "create", "--start", spec.to_str().unwrap()]);
    d.wait_console("auto", READY, Duration::from_secs(90));
    assert_eq!(d.info("auto")["accel"], accel["chosen"]);
}

/// The probe boot itself tells a KVM that cannot run guests from one that
/// can: on this machine's PVM module it must fail within its bound, however
/// `/dev/kvm` and `query-kvm` look; on hardware KVM it must succeed.
#[test]
fn probe_boot_is_not_fooled_by_pvm() {
    let _g = serial_guard();
    let facts = HostVirtFacts::read();
    let img = image_dir();
    let work = tempfile::tempdir().unwrap();
    let bound = Duration::from_secs(6);
    let cfg = ProbeConfig {
        qemu_binary: "qemu-system-x86_64".into(),
        kernel: img.join("vmlinux"),
        initrd: img.join("initrd.img"),
        qboot_rom: "/usr/share/qemu/qboot.rom".into(),
        timeout: bound,
        work_dir: work.path().to_path_buf(),
    };
    let t = Instant::now();
    let r = probe_boot(&cfg);
    assert!(
        t.elapsed() < bound + Duration::from_secs(5),
        "probe overran its bound: {:?}",
        t.elapsed()
    );
    if facts.kvm_modules.iter().any(|m| m == "kvm_pvm") {
        assert!(r.is_err(), "the probe boot claimed PVM KVM works: {r:?}");
        assert!(static_verdict(&facts).is_err());
    } else if static_verdict(&facts).is_ok() {
        assert!(r.is_ok(), "hardware KVM probe failed: {r:?}");
    }
}
