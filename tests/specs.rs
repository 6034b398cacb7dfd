//! Invalid specs are rejected through the real daemon and CLI, naming the
//! problem, and start no QEMU.

use tandem_tests::{serial_guard, Daemon};

fn rejected(d: &Daemon, name: &str, spec: &str) -> String {
    let path = d.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, spec).unwrap();
    let out = d.cli(&["vm", "create", "--start", path.to_str().unwrap()]);
    assert!(!out.status.success(), "{name}: accepted an invalid spec");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn invalid_specs_name_the_problem_and_change_nothing() {
    let _g = serial_guard();
    let d = Daemon::start();
    let good = d.guest_spec("v", "");

    let e = rejected(
        &d,
        "unknown",
        &good.replace("memory_mib = 128", "memory_mib = 128\nmemroy = 5"),
    );
    assert!(e.contains("unknown field `memroy`"), "{e}");

    let e = rejected(
        &d,
        "nokernel",
        &good.replace("/vmlinux\"", "/no-such-vmlinux\""),
    );
    assert!(
        e.contains("boot.kernel") && e.contains("does not exist"),
        "{e}"
    );

    let e = rejected(
        &d,
        "mem0",
        &good.replace("memory_mib = 128", "memory_mib = 0"),
    );
    assert!(e.contains("memory_mib"), "{e}");

    let dup = format!(
        "{good}\n[[nics]]\nname = \"eth1\"\nmac = \"52:54:00:99:00:02\"\nbackend = \"user\"\n"
    );
    let e = rejected(&d, "dupmac", &dup);
    assert!(
        e.contains("nics[1].mac") && e.contains("duplicate MAC"),
        "{e}"
    );

    let e = rejected(&d, "garbage", "\u{0}\u{1}not toml at all [[[");
    assert!(e.contains("invalid VM spec"), "{e}");

    assert_eq!(d.cli_json(&["vm", "list"]), serde_json::json!([]));
    assert!(
        d.qemu_processes().is_empty(),
        "an invalid spec left QEMU behind"
    );

    // The same name is free afterwards, and a duplicate name is refused.
    let path = d.dir.path().join("ok.toml");
    std::fs::write(&path, &good).unwrap();
    d.cli_ok(&["vm", "create", path.to_str().unwrap()]);
    let out = d.cli(&["vm", "create", path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // Operations on unknown VMs say so.
    let out = d.cli(&["vm", "start", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM named `nope`"));
}
