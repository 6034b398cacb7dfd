//! A guest's data is root's alone: another local user can neither read a
//! guest's RAM (running, checkpointed or restored), nor plant the RAM file
//! or the private directory a VM is about to use.
//!
//! The test runs as root (as CI does) and plays the local attacker with a
//! throwaway system user, removed on every exit path. One guest boots.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tandem_tests::{serial_guard, Daemon, READY};

const BOOT: Duration = Duration::from_secs(90);

/// A system user made for this test; `userdel`ed on drop (success or panic).
struct ProbeUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl ProbeUser {
    fn create() -> Self {
        let random = std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("random");
        let name = format!("tandem-probe-{}", &random.trim()[..8]);
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(&name)
            .output()
            .expect("run useradd");
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // From here on, Drop removes the user.
        let mut user = ProbeUser {
            name,
            uid: 0,
            gid: 0,
        };
        user.uid = id(&user.name, "-u");
        user.gid = id(&user.name, "-g");
        assert_ne!(user.uid, 0, "the probe user must not be root");
        user
    }

    /// Runs `argv` as this user, with no supplementary groups.
    fn run(&self, argv: &[&str]) -> Output {
        Command::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .args(["--clear-groups", "--"])
            .args(argv)
            .output()
            .expect("run setpriv")
    }

    /// `argv` as this user must succeed.
    fn ok(&self, argv: &[&str]) {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "as {}: {argv:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `argv` as this user must fail with "Permission denied".
    fn denied(&self, argv: &[&str]) {
        let out = self.run(argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("Permission denied"),
            "as {}: {argv:?} was not denied (status {}): it printed {} bytes, stderr {stderr:?}",
            self.name,
            out.status,
            out.stdout.len(),
        );
    }
}

impl Drop for ProbeUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

fn id(user: &str, flag: &str) -> u32 {
    let out = Command::new("id").args([flag, user]).output().expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

/// Mode bits and owner of `p` (not following a symlink).
fn mode_owner(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.mode() & 0o7777, m.uid())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A world-traversable directory (like /var/lib or a backup share) that
/// the test removes at the end.
struct OpenDir(PathBuf);

impl Drop for OpenDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn other_users_cannot_read_or_plant_guest_memory() {
    let _g = serial_guard();
    let probe = ProbeUser::create();
    let d = Daemon::start();
    // Let the probe walk to every file tandemd keeps, so only the modes of
    // tandemd's own directories and files can stop it; and make the RAM
    // directory what /dev/shm is: world-writable and sticky.
    std::fs::set_permissions(d.dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.ram_dir, PermissionsExt::from_mode(0o1777)).unwrap();

    d.create_guest("conf", "");
    let info = d.info("conf");
    let uuid = info["uuid"].as_str().expect("uuid");
    assert_eq!(uuid.len(), 36, "{info:#}");
    let ram_file = PathBuf::from(info["ram_file"].as_str().expect("ram_file"));
    let private = ram_file.parent().expect("RAM directory").to_path_buf();
    assert_eq!(private.parent(), Some(d.ram_dir.as_path()), "{info:#}");
    assert!(!private.exists(), "created before the first start");

    // Before the first start, the attacker plants the private directory:
    // as a symlink to a directory of theirs, then as their own directory
    // holding a RAM file of theirs. tandemd refuses both; it never uses them.
    probe.ok(&["ln", "-s", "/tmp", s(&private)]);
    let out = d.cli(&["vm", "start", "conf"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refusing"), "{err}");
    std::fs::remove_file(&private).unwrap();
    probe.ok(&["mkdir", s(&private)]);
    probe.ok(&["touch", s(&ram_file)]);
    let out = d.cli(&["vm", "start", "conf"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("owned by uid {}", probe.uid)),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&ram_file).unwrap().len(), 0);
    assert_eq!(d.info("conf")["state"], "defined");
    std::fs::remove_dir_all(&private).unwrap();

    d.cli_ok(&["vm", "start", "conf"]);
    d.wait_console("conf", READY, BOOT);
    assert_eq!(d.info("conf")["uuid"], uuid, "the UUID changed at start");

    // The layout: a root-only directory, a root-only RAM file of the
    // guest's size, a root-only VM directory.
    assert_eq!(mode_owner(&private), (0o700, 0));
    assert_eq!(mode_owner(&ram_file), (0o600, 0));
    assert_eq!(std::fs::metadata(&ram_file).unwrap().len(), 128 << 20);
    let vm_dir = d.state_dir.join("vms").join("conf");
    assert_eq!(mode_owner(&vm_dir), (0o700, 0));
    let record = std::fs::read_to_string(vm_dir.join("vm.json")).unwrap();
    assert!(record.contains(uuid), "vm.json lacks the UUID");
    assert_eq!(mode_owner(&vm_dir.join("vm.json")).0, 0o600);

    // The attacker, while the guest runs: no reading its memory, no
    // listing or writing the RAM directory, no planting the RAM file of
    // the next VM, no console log.
    probe.denied(&["head", "-c", "4096", s(&ram_file)]);
    probe.denied(&["ls", s(&private)]);
    probe.denied(&["touch", s(&private.join("intruder"))]);
    d.create_guest("next", "");
    let next_ram = PathBuf::from(d.info("next")["ram_file"].as_str().unwrap().to_string());
    assert_eq!(next_ram.parent(), Some(private.as_path()));
    probe.denied(&["touch", s(&next_ram)]);
    probe.denied(&["ln", "-s", "/tmp/x", s(&next_ram)]);
    probe.denied(&["cat", s(&vm_dir.join("serial.log"))]);
    probe.denied(&["ls", s(&vm_dir)]);

    // A checkpoint holds the guest's memory too, even under a directory
    // anyone may walk through.
    let open = OpenDir(PathBuf::from(format!(
        "/tmp/tandem-confinement-{}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&open.0);
    std::fs::create_dir(&open.0).unwrap();
    std::fs::set_permissions(&open.0, PermissionsExt::from_mode(0o755)).unwrap();
    let ck = open.0.join("ck");
    d.cli_json(&["vm", "checkpoint", "conf", s(&ck)]);
    assert_eq!(mode_owner(&ck), (0o700, 0));
    let mut files = 0;
    for e in std::fs::read_dir(&ck).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode_owner(&p), (0o600, 0), "{}", p.display());
        files += 1;
    }
    assert_eq!(files, 4, "ram, device-state, disk, manifest");
    probe.denied(&["ls", s(&ck)]);
    probe.denied(&["head", "-c", "4096", s(&ck.join("ram"))]);
    probe.denied(&["cat", s(&ck.join("checkpoint.json"))]);

    // Restored from it, the guest's RAM and disk are private again, even
    // if the checkpoint's files were opened up meanwhile.
    d.cli_ok(&["vm", "stop", "conf", "--force"]);
    assert!(!ram_file.exists(), "the RAM file outlived its QEMU");
    for e in std::fs::read_dir(&ck).unwrap() {
        std::fs::set_permissions(e.unwrap().path(), PermissionsExt::from_mode(0o644)).unwrap();
    }
    let restored = d.cli_json(&["vm", "restore", "conf", s(&ck)]);
    assert_eq!(restored["state"], "running", "{restored:#}");
    assert_eq!(restored["uuid"], uuid);
    assert_eq!(mode_owner(&ram_file), (0o600, 0));
    let disk = vm_dir.join("restored-disk-data.qcow2");
    assert_eq!(mode_owner(&disk), (0o600, 0));
    probe.denied(&["head", "-c", "4096", s(&ram_file)]);
    d.cli_ok(&["vm", "destroy", "conf"]);
    assert!(!ram_file.exists());
}
