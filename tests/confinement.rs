//! A guest's data is root's alone: another local user can neither read a
//! guest's RAM (running, checkpointed or restored), nor plant the RAM file
//! or the private directory a VM is about to use; nor use tandemd's API
//! unless root or in its `--api-group`, nor change anything through the
//! read-only socket; nor have checkpoints written or read outside the
//! checkpoint root.
//!
//! The tests run as root (as CI does) and play the local attacker with a
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
        self.run_in(None, argv)
    }

    /// Runs `argv` as this user, with `group` (if any) as its one
    /// supplementary group.
    fn run_in(&self, group: Option<u32>, argv: &[&str]) -> Output {
        let groups = match group {
            Some(g) => format!("--groups={g}"),
            None => "--clear-groups".to_string(),
        };
        Command::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg(groups)
            .arg("--")
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

/// A system group made for a test; `groupdel`ed on drop.
struct ProbeGroup {
    name: String,
    gid: u32,
}

impl ProbeGroup {
    fn create() -> Self {
        let random = std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("random");
        let name = format!("tandem-api-{}", &random.trim()[..8]);
        let out = Command::new("groupadd")
            .arg("--system")
            .arg(&name)
            .output()
            .expect("run groupadd");
        assert!(
            out.status.success(),
            "groupadd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut group = ProbeGroup { name, gid: 0 };
        let out = Command::new("getent")
            .args(["group", &group.name])
            .output()
            .expect("getent");
        group.gid = String::from_utf8_lossy(&out.stdout)
            .split(':')
            .nth(2)
            .and_then(|g| g.trim().parse().ok())
            .expect("the new group's gid");
        group
    }
}

impl Drop for ProbeGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
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
    // A checkpoint holds the guest's memory: even under a checkpoint root
    // anyone may walk through (like /var/lib or a backup share), its own
    // directory and files are root's.
    let open = OpenDir(PathBuf::from(format!(
        "/tmp/tandem-confinement-{}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&open.0);
    std::fs::create_dir(&open.0).unwrap();
    std::fs::set_permissions(&open.0, PermissionsExt::from_mode(0o755)).unwrap();
    let d = Daemon::start_with(&["--checkpoint-root", s(&open.0)]);
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

    // A checkpoint holds the guest's memory too.
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

/// Runs the CLI as `probe` (in `group`, if any) against `socket`.
fn cli_as(probe: &ProbeUser, group: Option<u32>, socket: &Path, args: &[&str]) -> Output {
    let tandem = tandem_tests::bin("tandem");
    let mut argv = vec![s(&tandem), "--socket", s(socket)];
    argv.extend_from_slice(args);
    probe.run_in(group, &argv)
}

fn refused(out: &Output, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(why),
        "not refused with {why:?} (status {}): stdout {} stderr {stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
    );
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Audit M5: the API is root's and its group's, checked on every
/// connection whatever the socket's mode; the read-only socket changes
/// nothing; checkpoints stay under the checkpoint root, and a restore
/// reads only files inside its checkpoint. No guest boots.
#[test]
fn the_api_is_root_and_its_group_and_checkpoints_stay_under_their_root() {
    let probe = ProbeUser::create();
    let group = ProbeGroup::create();
    let ro_dir = OpenDir(PathBuf::from(format!(
        "/tmp/tandem-api-ro-{}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&ro_dir.0);
    let ro = ro_dir.0.join("tandemd-ro.sock");
    let d = Daemon::start_with(&["--api-group", &group.name, "--api-ro-socket", s(&ro)]);
    // Let the probe walk to the socket: only its mode and tandemd's own
    // check can stop it.
    std::fs::set_permissions(d.dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let rw = d.socket.clone();
    let m = std::fs::symlink_metadata(&rw).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o660, 0, group.gid));
    assert_eq!(mode_owner(&ro), (0o666, 0));
    assert_eq!(
        mode_owner(&ro_dir.0),
        (0o755, 0),
        "the directory tandemd made"
    );
    d.create_guest("idle", "");

    // Not root, not in the group: the socket's mode keeps the probe out...
    let out = cli_as(&probe, None, &rw, &["vm", "list"]);
    refused(&out, "Permission denied");
    // ...and where the mode does not (opened by mistake), tandemd's own
    // check of the peer does, for reads and changes alike, and logs it.
    std::fs::set_permissions(&rw, PermissionsExt::from_mode(0o666)).unwrap();
    refused(
        &cli_as(&probe, None, &rw, &["vm", "list"]),
        "may not use tandemd's API",
    );
    refused(
        &cli_as(&probe, None, &rw, &["vm", "destroy", "idle"]),
        &format!("uid {} may not use tandemd's API", probe.uid),
    );
    assert_eq!(
        d.info("idle")["state"],
        "defined",
        "a refused request acted"
    );
    assert!(
        d.log().contains("refused an API request"),
        "no log line for the refusal"
    );
    // A member of the API group may (as a supplementary group).
    let out = cli_as(&probe, Some(group.gid), &rw, &["vm", "list"]);
    succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("idle"));
    // Past the check, a change is up to the VM's state, as for root.
    refused(
        &cli_as(&probe, Some(group.gid), &rw, &["vm", "pause", "idle"]),
        "cannot pause",
    );

    // The read-only socket: status for anyone who reaches it, no change,
    // not even for root, and no guest console.
    let out = cli_as(&probe, None, &ro, &["vm", "list"]);
    succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("idle"));
    for args in [
        &["vm", "destroy", "idle"][..],
        &["vm", "start", "idle"][..],
        &["vm", "console", "idle"][..],
    ] {
        refused(&cli_as(&probe, None, &ro, args), "read-only socket");
    }
    let out = Command::new(tandem_tests::bin("tandem"))
        .arg("--socket")
        .arg(&ro)
        .args(["vm", "destroy", "idle"])
        .output()
        .unwrap();
    refused(&out, "read-only socket");
    assert_eq!(d.info("idle")["state"], "defined");

    // Checkpoints: only under the checkpoint root (STATE/checkpoints,
    // made 0700), refused before anything is written or read.
    let root = d.state_dir.join("checkpoints");
    assert_eq!(mode_owner(&root), (0o700, 0));
    let outside = d.dir.path().join("outside");
    let out = d.cli(&["vm", "checkpoint", "idle", s(&outside)]);
    refused(&out, "outside the checkpoint root");
    assert!(!outside.exists());
    refused(
        &d.cli(&["vm", "checkpoint", "idle", "../outside"]),
        "`..` is not allowed",
    );
    std::fs::create_dir(&outside).unwrap();
    refused(
        &d.cli(&["vm", "restore", "idle", s(&outside)]),
        "outside the checkpoint root",
    );
    // A checkpoint under the root whose manifest leads out of it: a
    // relative escape, an absolute path.
    let secret = d.dir.path().join("secret");
    std::fs::write(&secret, "not a disk").unwrap();
    for file in ["../../../secret".to_string(), s(&secret).to_string()] {
        let ck = root.join("evil");
        let _ = std::fs::remove_dir_all(&ck);
        std::fs::create_dir(&ck).unwrap();
        std::fs::write(ck.join("device-state"), b"").unwrap();
        std::fs::write(
            ck.join("checkpoint.json"),
            serde_json::json!({
                "vm": "idle", "taken_at": 0, "ram_bytes": 0, "device_state_bytes": 0,
                "disks": [{"name": "data", "file": file, "format": "raw"}],
            })
            .to_string(),
        )
        .unwrap();
        refused(
            &d.cli(&["vm", "restore", "idle", "evil"]),
            "not a plain file name",
        );
        let vm_dir = d.state_dir.join("vms").join("idle");
        let copied = std::fs::read_dir(&vm_dir).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("restored-")
        });
        assert!(!copied, "a disk was copied from outside the checkpoint");
    }
    assert_eq!(d.info("idle")["state"], "defined");
}
