//! Dirty-page tracking against real kernels.
//!
//! The soft-dirty tracker needs `CONFIG_MEM_SOFT_DIRTY`, which this host's
//! kernel may lack; the test guest runs Debian's kernel, which has it. So
//! the tracker is checked *inside the guest* (`SOFTDIRTY n`: a child maps a
//! memfd as QEMU maps guest RAM, and a replica updated with only the pages
//! the tracker reports must equal the memfd after every epoch), and on the
//! host tandemd must pick the tracker the host can actually run.

use std::time::Duration;

use tandem_tests::{request, serial_guard, Daemon, Netns, READY};

const BOOT: Duration = Duration::from_secs(90);

#[test]
fn soft_dirty_tracker_misses_no_write_on_a_soft_dirty_kernel() {
    let _serial = serial_guard();
    let ns = Netns::new("sd");
    let d = Daemon::start_in_netns(&ns.name, &[]);
    // User networking: the guest must have slirp's address for the forward.
    let spec = d
        .guest_spec("sd", "")
        .replace("tandem.ip=10.99.0.2/24", "tandem.ip=10.0.2.15/24")
        .replace(
            "backend = \"user\"\n",
            "backend = \"user\"\nhost_forwards = [{ host_port = 17070, guest_port = 7070 }]\n",
        );
    let path = std::env::temp_dir().join(format!("tandem-sd-{}.toml", std::process::id()));
    std::fs::write(&path, spec).expect("write spec");
    d.cli_ok(&["vm", "create", path.to_str().expect("utf8")]);
    let _ = std::fs::remove_file(&path);
    d.cli_ok(&["vm", "start", "sd"]);
    d.wait_console("sd", READY, BOOT);

    let reply = ns.within(|| {
        request("127.0.0.1:17070", "SOFTDIRTY 40", Duration::from_secs(180))
            .map_err(|e| e.to_string())
    });
    let reply = reply.unwrap_or_else(|e| {
        panic!(
            "SOFTDIRTY request failed: {e}\nconsole:\n{}",
            tandem_tests::tail(&d.console("sd"), 30)
        )
    });
    eprintln!("guest: {reply}");
    assert!(
        reply.starts_with("SOFTDIRTY ok "),
        "the tracker failed inside the guest: {reply}"
    );
    // One run on a memfd (punches seen through the file's ctime), one on
    // a tmpfs file (through an inotify watch, as tandemd's RAM files).
    let runs: Vec<&str> = reply
        .trim_start_matches("SOFTDIRTY ok ")
        .split(" | ")
        .collect();
    let kinds: Vec<&str> = runs.iter().map(|r| field_str(r, "punches")).collect();
    assert_eq!(kinds, ["ctime", "inotify"], "{reply}");
    for run in runs {
        let field = |k: &str| -> usize {
            field_str(run, k)
                .parse()
                .unwrap_or_else(|_| panic!("{k}= is not a number in {run}"))
        };
        assert_eq!(field("missed"), 0);
        assert!(
            field("writes") > 100,
            "too little was written to mean anything: {run}"
        );
        // Pages only read, never written, must not be reported: the bit
        // is per write, not per fault.
        assert_eq!(field("extra"), 0, "pages reported that nobody wrote: {run}");
    }
    d.cli_ok(&["vm", "stop", "sd", "--force"]);
}

/// `auto` picks `uffd` for a VM whose QEMU runs under `-sandbox on`: the
/// shim handed QEMU the preload and its socket, the registration and
/// QEMU's probe passed inside QEMU, and `ft status` names the tracker and
/// says why; the guest runs on, protected, epochs committing.
#[test]
fn auto_picks_uffd_for_a_sandboxed_qemu_and_says_why() {
    let _serial = serial_guard();
    let link = tempfile::Builder::new()
        .prefix("tandem-uffd-link-")
        .tempdir()
        .unwrap();
    let endpoint = format!("unix:{}/repl.sock", link.path().display());
    let b = tandem_tests::Daemon::start_with(&["--repl-listen", &endpoint]);
    let a = tandem_tests::Daemon::start();
    let spec = a.guest_spec("uf2", "sandbox = true");
    let path = a.dir.path().join("uf2.toml");
    std::fs::write(&path, spec).unwrap();
    a.cli_ok(&["vm", "create", path.to_str().unwrap()]);
    a.cli_ok(&["vm", "start", "uf2"]);
    a.wait_console("uf2", READY, BOOT);
    let pid = a.info("uf2")["pid"].as_u64().expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("-sandbox\0on,"),
        "QEMU runs without its sandbox"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("Seccomp:\t2"),
        "no seccomp filter: {status}"
    );
    a.cli_ok(&["protect", "uf2", "--backup", &endpoint, "--epoch-ms", "50"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let st = loop {
        let v = a.cli_json(&["ft", "status", "uf2"]);
        let s = v
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_default();
        if s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) >= 10 {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not protected: {s:#}\n{}",
            tandem_tests::tail(&a.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let tracker = st["tracker"].as_str().unwrap_or_default();
    eprintln!("tracker: {tracker}");
    assert!(
        tracker.starts_with("uffd (auto; registered inside QEMU")
            && tracker.contains("QEMU's probe saw user-mode, kernel-mode and first-touch writes")
            && tracker.ends_with("punches seen by inotify)"),
        "{st:#}"
    );
    let human = a.cli_ok(&["ft", "status", "uf2"]);
    assert!(
        human
            .lines()
            .any(|l| l.contains("tracker:") && l.contains("uffd (auto;")),
        "{human}"
    );
    a.cli_ok(&["unprotect", "uf2"]);
    a.cli_ok(&["vm", "stop", "uf2", "--force"]);
    drop(b);
}

/// The primary's (or backup's) `ft status` once `pred` holds.
fn wait_ft(
    d: &tandem_tests::Daemon,
    vm: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let v = d.cli_json(&["ft", "status", vm]);
        let s = v
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_default();
        if pred(&s) {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} not reached: {s:#}\n{}",
            tandem_tests::tail(&d.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// After a failover the guest runs on the backup on the replica's RAM file
/// in place (not beside its fence lease, where the shim puts the preload's
/// socket): protecting it onwards still finds the socket and tracks by
/// uffd.
#[test]
fn the_onward_protection_after_a_failover_tracks_by_uffd() {
    let _serial = serial_guard();
    let link = |tag: &str| {
        let d = tempfile::Builder::new().prefix(tag).tempdir().unwrap();
        let ep = format!("unix:{}/repl.sock", d.path().display());
        (d, ep)
    };
    let (_lb, ep_b) = link("tandem-uffd-b-");
    let (_lc, ep_c) = link("tandem-uffd-c-");
    let b = tandem_tests::Daemon::start_with(&["--repl-listen", &ep_b]);
    let a = tandem_tests::Daemon::start();
    let spec = a.guest_spec("uf3", "");
    let path = a.dir.path().join("uf3.toml");
    std::fs::write(&path, spec).unwrap();
    a.cli_ok(&["vm", "create", path.to_str().unwrap()]);
    a.cli_ok(&["vm", "start", "uf3"]);
    a.wait_console("uf3", READY, BOOT);
    a.cli_ok(&["protect", "uf3", "--backup", &ep_b, "--epoch-ms", "50"]);
    wait_ft(&a, "uf3", "protection", |s| {
        s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) >= 5
    });
    wait_ft(&b, "uf3", "standby", |s| s["state"] == "standby");
    let pid = a.info("uf3")["pid"].as_u64().expect("pid") as i32;
    // SAFETY: kill(2) of the QEMU this test's daemon started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_ft(&b, "uf3", "takeover", |s| s["state"] == "failed-over");
    let c = tandem_tests::Daemon::start_with(&["--repl-listen", &ep_c]);
    b.cli_ok(&["protect", "uf3", "--backup", &ep_c, "--epoch-ms", "50"]);
    let st = wait_ft(&b, "uf3", "protection from B", |s| {
        s["role"] == "primary"
            && s["state"] == "protected"
            && s["last_committed"].as_u64().unwrap_or(0) >= 3
    });
    let tracker = st["tracker"].as_str().unwrap_or_default();
    eprintln!("onward: {tracker}");
    assert!(
        tracker.starts_with("uffd (auto; registered inside QEMU"),
        "{st:#}"
    );
    b.cli_ok(&["unprotect", "uf3"]);
    b.cli_ok(&["vm", "stop", "uf3", "--force"]);
    drop(c);
}

/// The value of `key=` in a `key=value …` summary.
fn field_str<'a>(summary: &'a str, key: &str) -> &'a str {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {summary}"))
}

// ---- The uffd tracker, in a real QEMU -----------------------------------

mod uffd {
    use std::fs::File;
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};
    use tandem_dirty::{data_pages, DirtyTracker, RamView, UffdTracker, PAGE_SIZE};
    use tandem_supervisor::shim::{uffd_socket, SocketFile, UffdHandoff};
    use tandem_tests::{bin, image_dir, request, serial_guard, Netns, READY};

    /// QEMU runs as this user (nobody), as an unprivileged QEMU would.
    const QEMU_UID: u32 = 65534;
    const MIB: u64 = 256;
    const PORT: u16 = 17071;

    /// A minimal synchronous QMP client.
    struct Qmp {
        r: BufReader<UnixStream>,
        w: UnixStream,
    }

    impl Qmp {
        fn connect(path: &Path) -> Qmp {
            let deadline = Instant::now() + Duration::from_secs(30);
            let s = loop {
                match UnixStream::connect(path) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => panic!("QMP {}: {e}", path.display()),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut q = Qmp {
                r: BufReader::new(s.try_clone().unwrap()),
                w: s,
            };
            let mut greeting = String::new();
            q.r.read_line(&mut greeting).expect("QMP greeting");
            q.cmd("qmp_capabilities", json!({}));
            q
        }

        fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
            let line = json!({"execute": execute, "arguments": arguments}).to_string();
            writeln!(self.w, "{line}").expect("QMP write");
            loop {
                let mut l = String::new();
                assert!(
                    self.r.read_line(&mut l).expect("QMP read") > 0,
                    "QMP closed"
                );
                let v: Value = serde_json::from_str(&l).expect("QMP JSON");
                if let Some(r) = v.get("return") {
                    return r.clone();
                }
                if let Some(e) = v.get("error") {
                    panic!("QMP {execute}: {e}");
                }
            }
        }

        fn read_bytes(&mut self) -> u64 {
            let stats = self.cmd("query-blockstats", json!({}));
            stats
                .as_array()
                .expect("blockstats")
                .iter()
                .filter_map(|s| s["stats"]["rd_bytes"].as_u64())
                .sum()
        }
    }

    /// A QEMU started as `tandemd shim` starts it (the preload and its
    /// socket handed over the same way, by the same code), but directly,
    /// as an unprivileged user, with `-sandbox on`, and with a QMP monitor
    /// of the test's own.
    struct Vm {
        qemu: Child,
        work: tempfile::TempDir,
        ram_dir: PathBuf,
        ram: File,
        qmp: Qmp,
        serial: PathBuf,
        ns: Netns,
        _socket: SocketFile,
    }

    impl Drop for Vm {
        fn drop(&mut self) {
            let _ = self.qemu.kill();
            let _ = self.qemu.wait();
            let _ = std::fs::remove_dir_all(&self.ram_dir);
        }
    }

    fn chown(p: &Path) {
        std::os::unix::fs::chown(p, Some(QEMU_UID), Some(QEMU_UID)).expect("chown");
    }

    impl Vm {
        fn start() -> Vm {
            let ns = Netns::new("uf");
            let img = image_dir();
            let work = tempfile::Builder::new()
                .prefix("tandem-uffd-")
                .tempdir()
                .unwrap();
            chown(work.path());
            let disk = work.path().join("data.qcow2");
            std::fs::copy(img.join("data.qcow2"), &disk).unwrap();
            chown(&disk);
            // The RAM file where tandemd keeps it: a private directory on
            // tmpfs (here QEMU's user's, as an unprivileged QEMU needs).
            let ram_dir = PathBuf::from(format!("/dev/shm/tandem-uffd-e2e-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&ram_dir);
            std::fs::create_dir(&ram_dir).unwrap();
            std::fs::set_permissions(
                &ram_dir,
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )
            .unwrap();
            chown(&ram_dir);
            let ram_path = ram_dir.join("vm.ram");
            let ram = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&ram_path)
                .unwrap();
            ram.set_len(MIB << 20).unwrap();
            chown(&ram_path);
            let spec_text = format!(
                r#"name = "uf"
memory_mib = {MIB}
accelerator = "tcg"
sandbox = true
[boot]
kernel = "{k}"
initrd = "{i}"
cmdline = "console=ttyS0 loglevel=4 tandem.ip=10.0.2.15/24"
[[disks]]
name = "data"
path = "{d}"
[[nics]]
name = "eth0"
mac = "52:54:00:99:00:07"
backend = "user"
host_forwards = [{{ host_port = {PORT}, guest_port = 7070 }}]
"#,
                k = img.join("vmlinux").display(),
                i = img.join("initrd.img").display(),
                d = disk.display(),
            );
            let spec = tandem_vmspec::parse_and_validate(&spec_text, |p| p.exists()).unwrap();
            let qmp_path = work.path().join("qmp.sock");
            let serial = work.path().join("serial.log");
            let rt = tandem_vmspec::RuntimePaths {
                qemu_binary: "/usr/bin/qemu-system-x86_64".into(),
                qmp_socket: qmp_path.clone(),
                serial_log: serial.clone(),
                ram_file: ram_path.clone(),
                qboot_rom: "/usr/share/qemu/qboot.rom".into(),
                accel: tandem_vmspec::Accel::Tcg,
                incoming: false,
                switch_dir: work.path().join("switch"),
            };
            let argv = tandem_vmspec::build_argv(&spec, &rt);
            assert!(argv.iter().any(|a| a == "-sandbox"), "{argv:?}");
            let handoff =
                UffdHandoff::bind(&uffd_socket(&ram_path), &bin("libtandem_uffd_preload.so"))
                    .expect("bind the uffd socket");
            let log = File::create(work.path().join("qemu.log")).unwrap();
            let (qemu, socket) = ns.within(move || {
                // Through a wrapper that execs QEMU (as the pause bench and
                // numactl-style wrappers do): the preload loads in both,
                // and the socket must end up served by QEMU.
                let mut cmd = Command::new("/bin/sh");
                cmd.args(["-c", "exec \"$0\" \"$@\"", "/usr/bin/qemu-system-x86_64"])
                    .args(&argv)
                    .uid(QEMU_UID)
                    .gid(QEMU_UID)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log);
                handoff.apply(&mut cmd);
                let child = cmd.spawn().expect("start QEMU");
                (child, handoff.into_socket_file())
            });
            let qmp = Qmp::connect(&qmp_path);
            let mut vm = Vm {
                qemu,
                work,
                ram_dir,
                ram,
                qmp,
                serial,
                ns,
                _socket: socket,
            };
            vm.qmp.cmd("cont", json!({}));
            vm.wait_ready(1);
            vm
        }

        fn console(&self) -> String {
            String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
        }

        /// Waits until the guest has printed its readiness line `n` times.
        fn wait_ready(&self, n: usize) {
            let deadline = Instant::now() + Duration::from_secs(180);
            while self.console().matches(READY).count() < n {
                assert!(
                    Instant::now() < deadline,
                    "guest not ready; console:\n{}\nQEMU log:\n{}",
                    tandem_tests::tail(&self.console(), 20),
                    std::fs::read_to_string(self.work.path().join("qemu.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        fn guest(&self, line: &str) -> String {
            let line = line.to_string();
            self.ns
                .within(move || {
                    request(&format!("127.0.0.1:{PORT}"), &line, Duration::from_secs(60))
                        .map_err(|e| e.to_string())
                })
                .unwrap_or_else(|e| panic!("guest request failed: {e}"))
        }

        fn contents(&self) -> Vec<u8> {
            let mut b = vec![0u8; (MIB << 20) as usize];
            self.ram.read_exact_at(&mut b, 0).unwrap();
            b
        }
    }

    /// A shared mapping of the RAM file in the test (tandemd's, or the
    /// switch's when written).
    struct Map {
        ptr: *mut u8,
        len: usize,
    }

    impl Map {
        fn new(f: &File, len: usize) -> Map {
            // SAFETY: a new shared mapping of the RAM file at an address
            // the kernel picks; unmapped on drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(
                p,
                libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            Map { ptr: p.cast(), len }
        }

        fn bytes(&self) -> &[u8] {
            // SAFETY: `len` mapped bytes for the life of `self`; read only
            // while the guest is stopped.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }

        fn fill(&self, page: usize, v: u8) {
            assert!(page * PAGE_SIZE < self.len);
            // SAFETY: one page inside the mapping; the guest is stopped.
            unsafe { std::ptr::write_bytes(self.ptr.add(page * PAGE_SIZE), v, PAGE_SIZE) };
        }

        fn remove(&self, page: usize) {
            assert!(page * PAGE_SIZE < self.len);
            // SAFETY: one page of our own mapping; its data goes, as
            // intended (MADV_REMOVE punches it out of the file).
            let rc = unsafe {
                libc::madvise(
                    self.ptr.add(page * PAGE_SIZE).cast(),
                    PAGE_SIZE,
                    libc::MADV_REMOVE,
                )
            };
            assert_eq!(rc, 0, "MADV_REMOVE: {}", std::io::Error::last_os_error());
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, used no more.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// The replica a backup would hold, fed only the reported pages.
    struct Replica {
        bytes: Vec<u8>,
        epochs: usize,
        changed: usize,
        reported: usize,
        /// Time spent in the checks (the guest is stopped meanwhile).
        time: Duration,
    }

    /// One checkpoint: stop (QEMU drains its I/O), collect, check every
    /// page of RAM against the replica, resume. Returns the reported pages.
    fn epoch(vm: &mut Vm, t: &mut UffdTracker, map: &Map, r: &mut Replica) -> Vec<u64> {
        let started = Instant::now();
        vm.qmp.cmd("stop", json!({}));
        // As tandemd calls it: no hole map (the tracker does not want one).
        assert!(!t.wants_data_pages());
        let dirty = t.collect(RamView::dense(map.bytes())).expect("collect");
        let now = vm.contents();
        let page = |p: usize| p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
        let mut reported = vec![false; now.len() / PAGE_SIZE];
        for &p in &dirty {
            reported[p as usize] = true;
        }
        let mut missed = Vec::new();
        for (p, &reported) in reported.iter().enumerate() {
            let range = page(p);
            if now[range.clone()] != r.bytes[range.clone()] {
                r.changed += 1;
                if !reported {
                    missed.push(p);
                }
            }
            if reported {
                r.bytes[range.clone()].copy_from_slice(&now[range]);
            }
        }
        r.epochs += 1;
        r.reported += dirty.len();
        r.time += started.elapsed();
        assert!(
            missed.is_empty(),
            "epoch {}: {} changed pages not reported, e.g. {:?}",
            r.epochs,
            missed.len(),
            &missed[..missed.len().min(10)]
        );
        vm.qmp.cmd("cont", json!({}));
        dirty
    }

    /// A page of the guest service's `DIRTY` buffer: a run of one value
    /// `v` (1..=253) then a run of `v + 1` (either run may be empty, but
    /// not both values zero).
    fn dirty_buffer_page(b: &[u8]) -> bool {
        let a = b[0];
        let k = b.iter().position(|&x| x != a).unwrap_or(b.len());
        if k == b.len() {
            return (2..=254).contains(&a);
        }
        let c = b[k];
        (1..=253).contains(&a) && c == a + 1 && b[k..].iter().all(|&x| x == c)
    }

    #[test]
    fn dirty_buffer_pages_are_recognised() {
        let mut b = vec![7u8; PAGE_SIZE];
        assert!(dirty_buffer_page(&b));
        b[..16].fill(6);
        assert!(dirty_buffer_page(&b));
        b[100] = 9;
        assert!(!dirty_buffer_page(&b));
        assert!(!dirty_buffer_page(&[0u8; PAGE_SIZE]));
        assert!(!dirty_buffer_page(&[255u8; PAGE_SIZE]));
    }

    /// Exactness of the uffd tracker against a QEMU that runs as an
    /// unprivileged user under `-sandbox on`: a replica fed only the
    /// reported pages equals guest RAM after every epoch, through guest
    /// CPU stores, pages first touched after protection began, a reboot
    /// (virtio-blk reads into guest RAM by QEMU's block layer: kernel-mode
    /// writes; QEMU's own writes of firmware tables), writes through
    /// another mapping (logged), and pages punched out (fallocate,
    /// MADV_REMOVE) and faulted back in by QEMU reading them and by the
    /// guest writing them.
    #[test]
    fn uffd_tracker_misses_no_write_in_an_unprivileged_sandboxed_qemu() {
        let _serial = serial_guard();
        let mut vm = Vm::start();
        let pages = ((MIB << 20) / PAGE_SIZE as u64) as usize;
        // `auto`, as the primary runs it, picks uffd for this QEMU.
        {
            use tandem_replication::tracker::{choose, TrackerChoice, TrackerContext};
            let ctx = TrackerContext {
                uffd_socket: Some(uffd_socket(&vm.ram_dir.join("vm.ram"))),
                qemu_pid: Some(vm.qemu.id()),
                ram_file: &vm.ram,
                pages,
                external_writers: false,
            };
            let (auto, note) = choose(TrackerChoice::Auto, &ctx).expect("auto");
            eprintln!("auto: {note}");
            assert_eq!(auto.name(), "uffd", "{note}");
            assert!(
                note.starts_with("uffd (auto; registered inside QEMU")
                    && note.contains(&format!("uid {QEMU_UID})")),
                "{note}"
            );
        }
        let socket = uffd_socket(&vm.ram_dir.join("vm.ram"));
        let mut t = UffdTracker::connect(&socket, &vm.ram, pages).expect("registration");
        eprintln!("registration: {}", t.registration());
        assert!(t.user_mode_only());
        assert!(
            t.registration().contains(&format!("uid {QEMU_UID}")),
            "{}",
            t.registration()
        );
        assert_eq!(t.punch_detection(), "inotify");
        let map = Map::new(&vm.ram, (MIB << 20) as usize);
        vm.qmp.cmd("stop", json!({}));
        let holes_at_start: Vec<bool> = {
            let data = data_pages(&vm.ram, map.bytes()).unwrap();
            (0..pages).map(|p| !data.contains(p)).collect()
        };
        vm.qmp.cmd("cont", json!({}));
        let mut r = Replica {
            bytes: vec![0xEE; (MIB << 20) as usize],
            epochs: 0,
            changed: 0,
            reported: 0,
            time: Duration::ZERO,
        };
        assert_eq!(epoch(&mut vm, &mut t, &map, &mut r).len(), pages);

        // Guest CPU stores; the first DIRTY allocates the guest's buffer,
        // much of it in pages the guest had never touched. Records put on
        // the guest's disk meanwhile are read back from it at the reboot.
        let mut first_touched = 0;
        for e in 0..8 {
            assert_eq!(vm.guest("DIRTY 2000"), "DIRTIED 2000");
            for i in 0..12 {
                let text: String = (0..3000)
                    .map(|k| (b'a' + ((e * 12 + i + k) % 26) as u8) as char)
                    .collect();
                assert!(vm.guest(&format!("PUT {text}")).starts_with("OK "));
            }
            let dirty = epoch(&mut vm, &mut t, &map, &mut r);
            first_touched += dirty
                .iter()
                .filter(|&&p| holes_at_start[p as usize])
                .count();
        }
        assert!(
            first_touched > 100,
            "only {first_touched} pages first touched"
        );

        // A reboot over RAM scribbled through another mapping (as the
        // switch writes, reported as external writes): every page the
        // firmware, QEMU and the guest's boot write afterwards differs
        // from the scribble, including the page cache the guest fills
        // from its virtio-blk disk while mounting it.
        // (Not the first MiB: the firmware expects it as a reboot leaves
        // it, not as a power-up may.)
        vm.qmp.cmd("stop", json!({}));
        let low = (1 << 20) / PAGE_SIZE;
        for p in low..pages {
            map.fill(p, 0xA5);
        }
        t.note_external_writes(&mut (low as u64..pages as u64));
        let rd_before = vm.qmp.read_bytes();
        vm.qmp.cmd("system_reset", json!({}));
        vm.qmp.cmd("cont", json!({}));
        let after_reset = epoch(&mut vm, &mut t, &map, &mut r);
        assert!(after_reset.len() >= pages - low, "the scribble is reported");
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut boot_epochs = 0;
        while vm.console().matches(READY).count() < 2 {
            assert!(
                Instant::now() < deadline,
                "no reboot: {}",
                tandem_tests::tail(&vm.console(), 20)
            );
            std::thread::sleep(Duration::from_millis(50));
            epoch(&mut vm, &mut t, &map, &mut r);
            boot_epochs += 1;
        }
        let rd = vm.qmp.read_bytes() - rd_before;
        assert!(
            vm.console().contains("records=96"),
            "the guest did not read its records back: {}",
            tandem_tests::tail(&vm.console(), 5)
        );
        assert!(
            rd >= 96 * 3000,
            "the reboot read only {rd} bytes from the disk"
        );
        eprintln!(
            "reboot: {boot_epochs} epochs, {rd} bytes read from the virtio-blk disk into guest RAM; {:.0} ms per checked epoch",
            r.time.as_secs_f64() * 1000.0 / r.epochs as f64
        );

        // Punches. The guest's DIRTY buffer is written and never read, so
        // pages of it can be punched out from under the guest without
        // harm. Its 4 KiB blocks are filled with 1, 2, 3, …, and start a
        // few bytes into a page (the allocator's header), so a page of it
        // is a run of `v` then a run of `v + 1`.
        assert_eq!(vm.guest("DIRTY 8192"), "DIRTIED 8192");
        let dirty = epoch(&mut vm, &mut t, &map, &mut r);
        vm.qmp.cmd("stop", json!({}));
        let now = vm.contents();
        let candidates: Vec<usize> = dirty
            .iter()
            .map(|&p| p as usize)
            .filter(|&p| dirty_buffer_page(&now[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]))
            .collect();
        assert!(
            candidates.len() >= 48,
            "only {} buffer pages found",
            candidates.len()
        );
        let step = candidates.len() / 48;
        let chosen: Vec<usize> = candidates.iter().step_by(step).take(48).copied().collect();
        let punch = |p: usize| {
            // SAFETY: fallocate(2) on the RAM file; it takes no pointers.
            let rc = unsafe {
                libc::fallocate(
                    vm.ram.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (p * PAGE_SIZE) as i64,
                    PAGE_SIZE as i64,
                )
            };
            assert_eq!(rc, 0, "punch: {}", std::io::Error::last_os_error());
        };
        for &p in &chosen[..16] {
            punch(p);
        }
        for &p in &chosen[16..32] {
            map.remove(p);
        }
        let dump = vm.work.path().join("pmem.bin");
        for &p in &chosen[32..] {
            punch(p);
            // QEMU reads the page (its memory below 4 GiB is the file at
            // the same offset): a read fault in QEMU's mapping brings it
            // back, clean, as zeroes.
            vm.qmp.cmd(
                "pmemsave",
                json!({"val": p * PAGE_SIZE, "size": PAGE_SIZE, "filename": dump}),
            );
        }
        assert_eq!(
            std::fs::read(&dump).unwrap(),
            vec![0u8; PAGE_SIZE],
            "QEMU read the punched page back as zeroes"
        );
        vm.qmp.cmd("cont", json!({}));
        let dirty = epoch(&mut vm, &mut t, &map, &mut r);
        for p in &chosen {
            assert!(
                dirty.contains(&(*p as u64)),
                "punched page {p} not reported"
            );
        }
        // The guest writes them again (write faults on punched pages).
        assert_eq!(vm.guest("DIRTY 8192"), "DIRTIED 8192");
        let dirty = epoch(&mut vm, &mut t, &map, &mut r);
        assert!(chosen.iter().all(|p| dirty.contains(&(*p as u64))));
        for _ in 0..3 {
            epoch(&mut vm, &mut t, &map, &mut r);
        }
        eprintln!(
            "uffd exactness: {} epochs, {} pages changed, {} reported, 0 missed; {first_touched} first touched after protection; {rd} bytes read from disk into RAM; 48 punched (16 fallocate, 16 MADV_REMOVE, 16 read back by QEMU)",
            r.epochs, r.changed, r.reported
        );
        assert_eq!(vm.guest("PING"), "PONG");
    }
}
