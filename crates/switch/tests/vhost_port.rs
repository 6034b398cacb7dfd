//! A VM port with a real QEMU (TCG) and tandem's test guest: the guest's
//! frames arrive at the ingress, ARP and ICMP echo work both ways through
//! the rings, and after QEMU is killed the port serves the next QEMU on
//! the same socket.
//!
//! Skipped (with a message) when the guest images or QEMU are missing.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tandem_switch::port::{EgressQueue, Ingress, PortCounters, PortId};
use tandem_switch::vhost::{VmPortConfig, VmPortHandle};

const IMAGES: &str = "/var/lib/tandem/images";
const QEMU: &str = "qemu-system-x86_64";
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const HOST_IP: [u8; 4] = [10, 0, 0, 1];
const PORT: PortId = 3;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// A tiny switch: records what the guest sends and answers ARP for
/// 10.0.0.1.
struct TestSwitch {
    frames: Mutex<Vec<Vec<u8>>>,
    cv: Condvar,
    egress: Arc<EgressQueue>,
}

impl Ingress for TestSwitch {
    fn ingress(&self, port: PortId, frame: &[u8]) {
        assert_eq!(port, PORT);
        if let Some(arp) = Arp::parse(frame) {
            if arp.op == 1 && arp.tpa == HOST_IP {
                self.egress
                    .push(arp_frame(2, HOST_MAC, HOST_IP, arp.sha, arp.spa));
            }
        }
        self.frames.lock().unwrap().push(frame.to_vec());
        self.cv.notify_all();
    }
}

impl TestSwitch {
    fn mark(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    /// The first frame recorded at or after `from` that `pred` accepts.
    fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = self.frames.lock().unwrap();
        let mut seen = from;
        loop {
            if let Some(f) = frames.iter().skip(seen).find(|f| pred(f)) {
                return Some(f.clone());
            }
            seen = frames.len();
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            frames = self.cv.wait_timeout(frames, deadline - now).unwrap().0;
        }
    }
}

struct Arp {
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tpa: [u8; 4],
}

impl Arp {
    fn parse(f: &[u8]) -> Option<Arp> {
        if f.len() < 42 || f[12..14] != [0x08, 0x06] {
            return None;
        }
        let a = &f[14..];
        Some(Arp {
            op: u16::from_be_bytes([a[6], a[7]]),
            sha: a[8..14].try_into().ok()?,
            spa: a[14..18].try_into().ok()?,
            tpa: a[24..28].try_into().ok()?,
        })
    }
}

fn arp_frame(op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4]) -> Vec<u8> {
    let dst = if op == 1 { [0xff; 6] } else { tha };
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(if op == 1 { &[0; 6] } else { &tha });
    f.extend_from_slice(&tpa);
    f.resize(60, 0);
    f
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_echo(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&HOST_IP);
    ip.extend_from_slice(&GUEST_IP);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// The ICMP echo reply's payload if `f` is the reply to (`id`, `seq`).
fn echo_reply_payload(f: &[u8], id: u16, seq: u16) -> Option<&[u8]> {
    if f.len() < 42 || f[12..14] != [0x08, 0x00] || f[0..6] != HOST_MAC {
        return None;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    if ip[9] != 1 || ip[12..16] != GUEST_IP || ip[16..20] != HOST_IP {
        return None;
    }
    let icmp = ip.get(ihl..)?;
    if icmp.len() < 8
        || icmp[0] != 0
        || icmp[4..6] != id.to_be_bytes()
        || icmp[6..8] != seq.to_be_bytes()
    {
        return None;
    }
    Some(&icmp[8..])
}

/// A QEMU process; killed and cleaned up on drop, whatever happens.
struct Qemu {
    child: Child,
    shm: PathBuf,
    serial: PathBuf,
    log: PathBuf,
    qmp: PathBuf,
}

impl Qemu {
    fn start(socket: &Path, dir: &Path, tag: &str, extra: &[&str]) -> Qemu {
        let img = Path::new(IMAGES);
        let shm = PathBuf::from(format!(
            "/dev/shm/tandem-vhost-test-{}-{tag}",
            std::process::id()
        ));
        let serial = dir.join(format!("serial-{tag}.log"));
        let log = dir.join(format!("qemu-{tag}.log"));
        let qmp = dir.join(format!("qmp-{tag}.sock"));
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(QEMU)
            .args([
                "-accel",
                "tcg",
                "-machine",
                "pc,memory-backend=mem",
                "-m",
                "256M",
            ])
            .args([
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
            ])
            .args(["-bios", QBOOT])
            .arg("-kernel")
            .arg(img.join("vmlinux"))
            .arg("-initrd")
            .arg(img.join("initrd.img"))
            .args(["-append", "console=ttyS0 loglevel=4 tandem.ip=10.0.0.2/24"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size=256M,mem-path={},share=on",
                shm.display()
            ))
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", socket.display()))
            .args(["-netdev", "vhost-user,id=n0,chardev=c0"])
            .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting QEMU");
        Qemu {
            child,
            shm,
            serial,
            log,
            qmp,
        }
    }

    /// Runs one QMP command and returns its `return` value.
    fn qmp(&self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(&self.qmp) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("QMP connect: {e}\n{}", self.diag()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let read_reply = |reader: &mut BufReader<UnixStream>| loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        };
        read_reply(&mut reader); // greeting
        writeln!(writer, r#"{{"execute":"qmp_capabilities"}}"#).unwrap();
        read_reply(&mut reader);
        let req = serde_json::json!({"execute": cmd, "arguments": args});
        writeln!(writer, "{req}").unwrap();
        let reply = read_reply(&mut reader);
        match reply.get("return") {
            Some(r) => r.clone(),
            None => panic!("QMP {cmd}: {reply}\n{}", self.diag()),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The tails of the serial console and QEMU's own output, for failures.
    fn diag(&self) -> String {
        let tail = |p: &Path| {
            let s = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "--- serial ---\n{}\n--- qemu ---\n{}",
            tail(&self.serial),
            tail(&self.log)
        )
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.shm);
    }
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

fn skip_reason() -> Option<String> {
    let img = Path::new(IMAGES);
    for f in ["vmlinux", "initrd.img"] {
        if !img.join(f).exists() {
            return Some(format!("{} missing", img.join(f).display()));
        }
    }
    if !Path::new(QBOOT).exists() {
        return Some(format!("{QBOOT} missing"));
    }
    let runs = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(runs, Ok(s) if s.success()) {
        return Some(format!("{QEMU} not runnable"));
    }
    None
}

/// Boots a guest on the port and checks both directions.
fn check_guest(port: &VmPortHandle, sw: &TestSwitch, qemu: &Qemu, connection: u64) {
    assert!(
        wait_until(Duration::from_secs(30), || port.connections() == connection),
        "frontend {connection} did not attach\n{}",
        qemu.diag()
    );
    assert!(
        wait_until(BOOT_TIMEOUT, || port.is_connected()),
        "guest rings never started\n{}",
        qemu.diag()
    );

    // Guest → port: anything from the guest's MAC (IPv6 DAD/RS, ARP...).
    let mark = sw.mark();
    let from_guest = sw.wait_for(mark, BOOT_TIMEOUT, |f| {
        f.len() >= 14 && f[6..12] == GUEST_MAC
    });
    assert!(
        from_guest.is_some(),
        "no frame from the guest\n{}",
        qemu.diag()
    );

    // Port → guest → port: ARP for the guest's address, until eth0 has it.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let reply = loop {
        let mark = sw.mark();
        sw.egress
            .push(arp_frame(1, HOST_MAC, HOST_IP, [0; 6], GUEST_IP));
        let reply = sw.wait_for(mark, Duration::from_secs(2), |f| {
            f[0..6] == HOST_MAC
                && Arp::parse(f)
                    .is_some_and(|a| a.op == 2 && a.sha == GUEST_MAC && a.spa == GUEST_IP)
        });
        if reply.is_some() || Instant::now() > deadline {
            break reply;
        }
    };
    assert!(
        reply.is_some(),
        "no ARP reply from the guest\n{}",
        qemu.diag()
    );

    // A near-MTU echo request and its reply, byte for byte.
    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 31 + 7) as u8).collect();
    let seq = connection as u16;
    let mut got = None;
    for _ in 0..5 {
        let mark = sw.mark();
        assert!(sw.egress.push(icmp_echo(0x7a11, seq, &payload)));
        got = sw.wait_for(mark, Duration::from_secs(5), |f| {
            echo_reply_payload(f, 0x7a11, seq).is_some()
        });
        if got.is_some() {
            break;
        }
    }
    let got = got.unwrap_or_else(|| panic!("no echo reply\n{}", qemu.diag()));
    assert_eq!(echo_reply_payload(&got, 0x7a11, seq), Some(&payload[..]));
}

struct Setup {
    socket: PathBuf,
    egress: Arc<EgressQueue>,
    counters: Arc<PortCounters>,
    sw: Arc<TestSwitch>,
    hooks: Arc<AtomicU64>,
    port: VmPortHandle,
}

/// A VM port on `dir`/vm0.sock with a test switch behind it.
fn setup(dir: &Path) -> Setup {
    let socket = dir.join("vm0.sock");
    let egress = Arc::new(EgressQueue::new(256, 1 << 20).unwrap());
    let counters = Arc::new(PortCounters::default());
    let sw = Arc::new(TestSwitch {
        frames: Mutex::new(Vec::new()),
        cv: Condvar::new(),
        egress: egress.clone(),
    });
    let hooks = Arc::new(AtomicU64::new(0));
    let port = {
        let hooks = hooks.clone();
        VmPortHandle::spawn_with_hook(
            VmPortConfig {
                id: PORT,
                socket: socket.clone(),
                name: "test-vm.eth0".into(),
            },
            egress.clone(),
            counters.clone(),
            sw.clone(),
            Some(Box::new(move || {
                hooks.fetch_add(1, Ordering::SeqCst);
            })),
        )
        .unwrap()
    };
    Setup {
        socket,
        egress,
        counters,
        sw,
        hooks,
        port,
    }
}

#[test]
fn vm_port_with_qemu_survives_a_killed_frontend() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping vm_port_with_qemu_survives_a_killed_frontend: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Setup {
        socket,
        egress,
        counters,
        sw,
        hooks,
        port,
    } = setup(dir.path());
    assert!(socket.exists());
    assert!(!port.is_connected());
    assert_eq!(port.connections(), 0);

    let mut qemu = Qemu::start(&socket, dir.path(), "a", &[]);
    check_guest(&port, &sw, &qemu, 1);
    assert!(hooks.load(Ordering::SeqCst) >= 1, "connect hook not run");
    let s = counters.snapshot();
    assert!(s.rx_frames > 0 && s.tx_frames >= 2, "{s:?}");
    assert_eq!(s.drops.bad_descriptor, 0, "{s:?}");
    assert_eq!(s.drops.malformed, 0, "{s:?}");

    // A guest reboot keeps the connection: QEMU stops the rings and the
    // rebooted guest's driver starts them again (the hook runs when rings
    // go from stopped to running).
    let hooks_before = hooks.load(Ordering::SeqCst);
    qemu.qmp("system_reset", serde_json::json!({}));
    assert!(
        wait_until(BOOT_TIMEOUT, || hooks.load(Ordering::SeqCst) > hooks_before),
        "rings did not restart after the reboot\n{}",
        qemu.diag()
    );
    check_guest(&port, &sw, &qemu, 1);
    assert_eq!(port.connections(), 1);

    // QEMU dies: the port notices, and frames for the guest are dropped
    // rather than kept for the next boot.
    qemu.kill();
    assert!(
        wait_until(Duration::from_secs(10), || !port.is_connected()),
        "port still connected after QEMU was killed"
    );
    let before = counters.snapshot().drops.no_buffer;
    assert!(egress.push(arp_frame(1, HOST_MAC, HOST_IP, [0; 6], GUEST_IP)));
    assert!(
        wait_until(Duration::from_secs(5), || egress.is_empty()),
        "stale frame kept while disconnected"
    );
    assert!(counters.snapshot().drops.no_buffer > before);
    drop(qemu);

    // The next QEMU on the same socket.
    let qemu = Qemu::start(&socket, dir.path(), "b", &[]);
    check_guest(&port, &sw, &qemu, 2);
    assert_eq!(port.connections(), 2);
    assert!(
        hooks.load(Ordering::SeqCst) >= 2,
        "connect hook not run again"
    );

    port.shutdown();
    assert!(!socket.exists(), "socket left behind");
    drop(qemu);
}

/// Live state moves to a new QEMU through a migration stream (to a file,
/// with the guest running while it is written: QEMU logs dirty pages
/// through this backend), and the guest carries on on the same port
/// without rebooting, announcing itself.
#[test]
fn vm_port_follows_a_migrated_guest() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping vm_port_follows_a_migrated_guest: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Setup {
        socket,
        egress,
        counters,
        sw,
        hooks,
        port,
    } = setup(dir.path());

    let mut qemu = Qemu::start(&socket, dir.path(), "src", &[]);
    check_guest(&port, &sw, &qemu, 1);

    // Keep the guest receiving while the state is written out, so the
    // backend dirties RX buffers during the migration.
    let state = dir.path().join("state.mig");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = {
        let (stop, egress) = (stop.clone(), egress.clone());
        std::thread::spawn(move || {
            let mut seq = 100u16;
            while !stop.load(Ordering::SeqCst) {
                egress.push(icmp_echo(0x5eed, seq, &[seq as u8; 200]));
                seq = seq.wrapping_add(1);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    qemu.qmp(
        "migrate",
        serde_json::json!({"uri": format!("file:{}", state.display())}),
    );
    let done = wait_until(Duration::from_secs(120), || {
        let st = qemu.qmp("query-migrate", serde_json::json!({}));
        let status = st["status"].as_str().unwrap_or("").to_owned();
        assert!(
            status != "failed",
            "migration failed: {st}\n{}",
            qemu.diag()
        );
        status == "completed"
    });
    stop.store(true, Ordering::SeqCst);
    pinger.join().unwrap();
    assert!(done, "migration did not complete\n{}", qemu.diag());
    assert_eq!(
        port.connections(),
        1,
        "migration must not cost the connection"
    );
    qemu.kill();
    assert!(wait_until(Duration::from_secs(10), || !port.is_connected()));
    drop(qemu);

    let mark = sw.mark();
    let incoming = format!("file:{}", state.display());
    let qemu = Qemu::start(&socket, dir.path(), "dst", &["-incoming", &incoming]);
    assert!(
        wait_until(Duration::from_secs(60), || port.is_connected()),
        "migrated guest's rings never started\n{}",
        qemu.diag()
    );
    assert_eq!(port.connections(), 2);
    assert!(hooks.load(Ordering::SeqCst) >= 2);
    // VIRTIO_NET_F_GUEST_ANNOUNCE: QEMU asks the guest to announce itself.
    let garp = sw.wait_for(mark, Duration::from_secs(60), |f| {
        Arp::parse(f).is_some_and(|a| a.sha == GUEST_MAC && a.spa == GUEST_IP && a.tpa == GUEST_IP)
    });
    assert!(
        garp.is_some(),
        "no gratuitous ARP after migration\n{}",
        qemu.diag()
    );
    check_guest(&port, &sw, &qemu, 2);
    let serial = || std::fs::read_to_string(&qemu.serial).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || serial().contains("tick")),
        "the guest is not running\n{}",
        qemu.diag()
    );
    assert!(
        !serial().contains("TANDEM-GUEST-READY"),
        "the guest rebooted"
    );
    let s = counters.snapshot();
    assert_eq!(s.drops.bad_descriptor + s.drops.malformed, 0, "{s:?}");
    port.shutdown();
    drop(qemu);
}
