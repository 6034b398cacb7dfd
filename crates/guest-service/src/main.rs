//! `tandem-guest`: PID 1 of tandem's test guest.
//!
//! It is what the tests and the failover drill talk to, so its behaviour is
//! the contract they rely on:
//! - prints `TANDEM-GUEST-READY` on the console once its TCP service listens;
//! - prints `tandem-guest: tick N` every 200 ms, so a host can see whether
//!   the guest ran (the pause test counts these);
//! - serves the line protocol in [`proto`] on TCP port 7070, making every
//!   `PUT` durable (fsync of `/data/records.log`) before it answers `OK <seq>`;
//! - checks an upload stream on port 7071 (a byte pattern, progress lines
//!   back on the same connection) and discards whatever arrives on 7072;
//! - powers the machine off cleanly on the ACPI power button or SIGTERM.
//!
//! Settings come from the environment (set by the image's `/init`):
//! `TANDEM_DATA_DIR` (default `/data`) and `TANDEM_PORT` (default 7070), so the
//! same binary can be run on a host for a quick look.

mod churn;
mod proto;
mod softdirty_check;
mod trackbench;

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::Request;

const READY_LINE: &str = "TANDEM-GUEST-READY";
const TICK: Duration = Duration::from_millis(200);
/// Linux input event codes (include/uapi/linux/input-event-codes.h).
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

struct Store {
    file: File,
    len: u64,
    records: Vec<String>,
}

impl Store {
    fn open(dir: &Path) -> std::io::Result<Store> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("records.log");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let rec = proto::recover(&bytes);
        if rec.valid_len != bytes.len() {
            say(&format!(
                "discarding {} torn bytes at the end of {}",
                bytes.len() - rec.valid_len,
                path.display()
            ));
            file.set_len(rec.valid_len as u64)?;
            file.sync_all()?;
        }
        Ok(Store {
            file,
            len: rec.valid_len as u64,
            records: rec.records,
        })
    }

    /// Appends and fsyncs one record; only then is its number handed out.
    fn put(&mut self, text: &str) -> std::io::Result<u64> {
        let seq = self.records.len() as u64 + 1;
        let line = proto::encode_record(seq, text);
        self.file.write_all_at(line.as_bytes(), self.len)?;
        self.file.sync_data()?;
        self.len += line.len() as u64;
        self.records.push(text.to_string());
        Ok(seq)
    }
}

fn say(msg: &str) {
    // One write per line keeps lines whole on the serial console.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("tandem-guest: {msg}\n").as_bytes());
    let _ = out.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "dirty-writer" {
        let pages = args[3].parse().unwrap_or(0);
        softdirty_check::writer(&args[2], pages);
    }
    let data_dir =
        PathBuf::from(std::env::var("TANDEM_DATA_DIR").unwrap_or_else(|_| "/data".into()));
    let port: u16 = std::env::var("TANDEM_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7070);

    let signals = block_termination_signals();
    if std::process::id() == 1 {
        std::thread::spawn(reap_children);
    }

    let store = match Store::open(&data_dir) {
        Ok(s) => s,
        Err(e) => {
            say(&format!(
                "cannot open record log in {}: {e}",
                data_dir.display()
            ));
            power_off(1);
        }
    };
    let recovered = store.records.len();
    let store = Arc::new(Mutex::new(store));

    let listener = match bind(port) {
        Ok(l) => l,
        Err(e) => {
            say(&format!("cannot listen on port {port}: {e}"));
            power_off(1);
        }
    };

    match bind(port.wrapping_add(1)) {
        Ok(l) => {
            std::thread::spawn(move || upload_listener(l));
        }
        Err(e) => say(&format!(
            "cannot listen on upload port {}: {e}",
            port.wrapping_add(1)
        )),
    }
    match bind(port.wrapping_add(2)) {
        Ok(l) => {
            std::thread::spawn(move || discard_listener(l));
        }
        Err(e) => say(&format!(
            "cannot listen on discard port {}: {e}",
            port.wrapping_add(2)
        )),
    }
    std::thread::spawn(move || wait_for_signal(signals));
    watch_power_buttons();
    println!("{READY_LINE} port={port} records={recovered}");
    std::thread::spawn(ticker);

    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let store = store.clone();
                std::thread::spawn(move || serve(stream, &store));
            }
            Err(e) => say(&format!("accept failed: {e}")),
        }
    }
}

fn bind(port: u16) -> std::io::Result<TcpListener> {
    // The address is configured by /init before we start, but give a slow
    // link a moment rather than failing the boot.
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last.expect("loop ran"))
}

fn ticker() {
    let mut n: u64 = 0;
    loop {
        n += 1;
        say(&format!("tick {n}"));
        std::thread::sleep(TICK);
    }
}

fn serve(stream: TcpStream, store: &Mutex<Store>) {
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = std::io::BufWriter::new(write_half);
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(proto::MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let reply = if n > proto::MAX_LINE {
            // The rest of an over-long line cannot be resynchronised safely.
            let _ = writeln!(out, "ERR line longer than {} bytes", proto::MAX_LINE);
            let _ = out.flush();
            return;
        } else {
            match std::str::from_utf8(&line) {
                Err(_) => "ERR request is not UTF-8".to_string(),
                Ok(text) => handle(text, store),
            }
        };
        if writeln!(out, "{reply}").and_then(|_| out.flush()).is_err() {
            return;
        }
    }
}

static CHURN: std::sync::OnceLock<churn::Churn> = std::sync::OnceLock::new();

fn handle(line: &str, store: &Mutex<Store>) -> String {
    let req = match proto::parse_request(line) {
        Ok(r) => r,
        Err(e) => return format!("ERR {e}"),
    };
    let churn = CHURN.get_or_init(churn::Churn::new);
    let store = || store.lock();
    match req {
        Request::Ping => "PONG".into(),
        Request::Churn(n) => churn.start(n),
        Request::Verify => churn.verify(),
        Request::Spin(n) => {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for i in 0..n {
                x = std::hint::black_box(x.rotate_left(7) ^ i).wrapping_mul(0x2545_f491_4f6c_dd1d);
            }
            format!("SPUN {n} {x:x}")
        }
        Request::Dirty(n) => dirty_pages(n),
        Request::SoftDirty(n) => softdirty_check::run(n),
        Request::TrackBench { mib, pages, epochs } => trackbench::run(mib, pages, epochs),
        Request::Dial(addr, line) => dial(addr, &line),
        Request::Blast(addr, ms) => blast(addr, ms),
        Request::UpStat => format!(
            "UPSTAT {} {}",
            UPLOAD_BYTES.load(Ordering::SeqCst),
            UPLOAD_BAD.load(Ordering::SeqCst)
        ),
        Request::Media(addr, count, every) => media(addr, count, every),
        Request::MulticastJoin(group, port) => multicast_join(group, port),
        Request::MulticastStat => MULTICAST.report("MSTAT"),
        Request::UnicastCount(port) => unicast_count(port),
        Request::UnicastStat => UNICAST.report("USTAT"),
        Request::Last => format!("LAST {}", store().records.len()),
        Request::Get(seq) => match seq
            .checked_sub(1)
            .and_then(|i| store().records.get(i as usize).cloned())
        {
            Some(text) => format!("REC {seq} {text}"),
            None => format!("NONE {seq}"),
        },
        Request::Put(text) => match store().put(&text) {
            Ok(seq) => format!("OK {seq}"),
            Err(e) => format!("ERR write failed: {e}"),
        },
    }
}

/// One request/reply exchange with another service, bounded by 2 s.
fn dial(addr: std::net::SocketAddr, line: &str) -> String {
    use std::io::BufRead;
    let bound = std::time::Duration::from_secs(2);
    let go = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, bound)?;
        s.set_read_timeout(Some(bound))?;
        s.set_write_timeout(Some(bound))?;
        writeln!(s, "{line}")?;
        let mut reply = String::new();
        std::io::BufReader::new(s).read_line(&mut reply)?;
        Ok(reply.trim_end().to_string())
    };
    match go() {
        Ok(r) => format!("DIALED {r}"),
        Err(e) => format!("DIALFAIL {e}"),
    }
}

/// Bytes received intact on the most recent upload connection, and
/// mismatches seen on any.
static UPLOAD_BYTES: AtomicU64 = AtomicU64::new(0);
static UPLOAD_BAD: AtomicU64 = AtomicU64::new(0);

/// The upload service (port + 1): a client streams the [`proto::upload_byte`]
/// pattern; every byte is checked, and progress lines go back on the same
/// connection, so the guest's outgoing segments carry acknowledgements of
/// the client's data (what output commit must clamp).
fn upload_listener(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || upload(conn));
    }
}

fn upload(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut input = stream;
    UPLOAD_BYTES.store(0, Ordering::SeqCst);
    let mut got: u64 = 0;
    let mut reported = std::time::Instant::now();
    let mut buf = vec![0u8; 16384];
    loop {
        match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                for (i, b) in buf[..n].iter().enumerate() {
                    if *b != proto::upload_byte(got + i as u64) {
                        UPLOAD_BAD.fetch_add(1, Ordering::SeqCst);
                        say(&format!("upload mismatch at byte {}", got + i as u64));
                        return;
                    }
                }
                got += n as u64;
                UPLOAD_BYTES.store(got, Ordering::SeqCst);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
        if reported.elapsed() >= Duration::from_millis(10) {
            reported = std::time::Instant::now();
            if writeln!(out, "RCVD {got}").is_err() {
                return;
            }
        }
    }
}

/// The discard service (port + 2): reads and throws away whatever a peer
/// sends, as the far end of throughput measurements between guests.
fn discard_listener(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut conn = conn;
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        });
    }
}

/// Sends `count` datagrams `MEDIA <seq> <count>` to `addr`, one every
/// `every` ms.
fn media(addr: std::net::SocketAddr, count: u32, every: u64) -> String {
    let sock = match std::net::UdpSocket::bind(("0.0.0.0", 0)) {
        Ok(s) => s,
        Err(e) => return format!("MEDIAFAIL {e}"),
    };
    let start = std::time::Instant::now();
    let mut sent = 0;
    for seq in 0..count {
        let due = start + Duration::from_millis(every * u64::from(seq));
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        if sock
            .send_to(format!("MEDIA {seq} {count}").as_bytes(), addr)
            .is_ok()
        {
            sent += 1;
        }
    }
    format!("MEDIAED {sent}")
}

/// A numbered datagram stream's account: datagrams received, the highest
/// leading number (a sender numbers its stream), numbers skipped between
/// datagrams (lost on the way), and datagrams that came at or below the
/// highest number seen (reordered or repeated): what a switchover must
/// keep at zero.
struct SeqCounter {
    datagrams: AtomicU64,
    last: AtomicU64,
    missing: AtomicU64,
    disordered: AtomicU64,
}

impl SeqCounter {
    const fn new() -> Self {
        Self {
            datagrams: AtomicU64::new(0),
            last: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            disordered: AtomicU64::new(0),
        }
    }

    /// Counts what arrives on `sock`, in a thread of its own (the only
    /// writer of `last`, so load-then-store is exact).
    fn count(&'static self, sock: std::net::UdpSocket) {
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                self.datagrams.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&buf[..n]);
                if let Some(seq) = text.split_whitespace().find_map(|w| w.parse::<u64>().ok()) {
                    let last = self.last.load(Ordering::SeqCst);
                    if last != 0 && seq <= last {
                        self.disordered.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    if last != 0 {
                        self.missing.fetch_add(seq - last - 1, Ordering::SeqCst);
                    }
                    self.last.store(seq, Ordering::SeqCst);
                }
            }
        });
    }

    fn report(&self, word: &str) -> String {
        format!(
            "{word} {} {} {} {}",
            self.datagrams.load(Ordering::SeqCst),
            self.last.load(Ordering::SeqCst),
            self.missing.load(Ordering::SeqCst),
            self.disordered.load(Ordering::SeqCst)
        )
    }
}

static MULTICAST: SeqCounter = SeqCounter::new();
static UNICAST: SeqCounter = SeqCounter::new();

/// Joins `group` (the kernel then answers IGMP queries for it, which is
/// what a snooping switch learns the membership from) and counts what
/// arrives on `port`. One group at a time is all the tests need; a second
/// join adds another listener.
fn multicast_join(group: std::net::Ipv4Addr, port: u16) -> String {
    let sock = match std::net::UdpSocket::bind(("0.0.0.0", port)) {
        Ok(s) => s,
        Err(e) => return format!("MJOINFAIL {e}"),
    };
    if let Err(e) = sock.join_multicast_v4(&group, &std::net::Ipv4Addr::UNSPECIFIED) {
        return format!("MJOINFAIL {e}");
    }
    MULTICAST.count(sock);
    format!("MJOINED {group} {port}")
}

/// Counts numbered unicast datagrams to `port`.
fn unicast_count(port: u16) -> String {
    match std::net::UdpSocket::bind(("0.0.0.0", port)) {
        Ok(sock) => {
            UNICAST.count(sock);
            format!("UCOUNTING {port}")
        }
        Err(e) => format!("UCOUNTFAIL {e}"),
    }
}

/// Sends zeros to `addr` over TCP for `ms` milliseconds.
fn blast(addr: std::net::SocketAddr, ms: u64) -> String {
    let t = std::time::Instant::now();
    let until = std::time::Duration::from_millis(ms);
    let mut s = match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
    {
        Ok(s) => s,
        Err(e) => return format!("DIALFAIL {e}"),
    };
    let _ = s.set_write_timeout(Some(std::time::Duration::from_millis(200)));
    let buf = [0u8; 16384];
    let mut sent: u64 = 0;
    while t.elapsed() < until {
        match s.write(&buf) {
            Ok(n) => sent += n as u64,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return format!("DIALFAIL after {sent} bytes: {e}"),
        }
    }
    format!("BLASTED {sent} {}", t.elapsed().as_millis())
}

/// Writes `n` pages of a 32 MiB buffer, round robin: a memory-dirtying
/// load for replication benchmarks.
fn dirty_pages(n: u64) -> String {
    static BUF: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    const PAGES: u64 = 8192;
    let mut buf = BUF.lock();
    if buf.is_empty() {
        buf.resize(PAGES as usize * 4096, 0);
    }
    for i in 0..n {
        let off = ((i % PAGES) * 4096) as usize;
        buf[off..off + 4096].fill((i as u8).wrapping_add(1));
    }
    format!("DIRTIED {n}")
}

/// Each input device that can report KEY_POWER gets a reader thread; the
/// ACPI button driver registers "Power Button" devices at boot.
fn watch_power_buttons() {
    let Ok(dir) = std::fs::read_dir("/dev/input") else {
        say("no /dev/input: the power button will not work");
        return;
    };
    let mut watched = Vec::new();
    for entry in dir.flatten() {
        let path = entry.path();
        if !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("event"))
        {
            continue;
        }
        if let Ok(f) = File::open(&path) {
            watched.push(path.display().to_string());
            std::thread::spawn(move || read_input_events(f));
        }
    }
    say(&format!(
        "watching {} for the power button",
        watched.join(" ")
    ));
}

fn read_input_events(mut dev: File) {
    // struct input_event on x86_64: timeval (16) + type u16 + code u16 + value i32.
    let mut ev = [0u8; 24];
    while dev.read_exact(&mut ev).is_ok() {
        let kind = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if kind == EV_KEY && code == KEY_POWER && value == 1 {
            power_off(0);
        }
    }
}

fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
    // pthread_sigmask only changes this thread's mask, inherited by threads
    // spawned after it, so sigwait below is the only consumer.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: libc::sigset_t) {
    let mut sig = 0;
    // SAFETY: `set` is an initialised signal set and `sig` a valid out pointer.
    if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
        power_off(0);
    }
}

fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer; -1 means any child.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn power_off(code: i32) -> ! {
    say("powering off");
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    if std::process::id() != 1 {
        std::process::exit(code);
    }
    let target = c"/data";
    // SAFETY: a valid NUL-terminated path; failure (busy, not mounted) is
    // harmless because the filesystem was synced above.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    // SAFETY: as PID 1 we own the machine; RB_POWER_OFF does not return on
    // success, and PID 1 must never exit (the kernel would panic).
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
