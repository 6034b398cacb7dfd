//! `tandem bench tls`: what mutual TLS costs on the replication link.
//! Plain TCP and mutual TLS on 127.0.0.1, side by side in one run, with
//! the same guest and the same dirty rates.
//!
//! Per link (the order alternates per round): a fresh pair of tandemds on
//! this host, B listening on a TCP port of 127.0.0.1; for `tls` each has a
//! host identity of a standalone pair (`tandem cluster init --standalone
//! host-a host-b`, made once per run; B admits host-a by `--repl-peers`)
//! and A protects to `host-b@127.0.0.1:PORT`, for `tcp` neither has one.
//! The guest (no disk, user networking, the guest service forwarded to a
//! local port) boots on A and is protected to B; then, per dirty rate, a
//! window with the guest service's `DIRTY` sent once per epoch (as `bench
//! pause` does). Measured per window:
//!
//! - the epoch **pause**, from the primary QEMU's own STOP/RESUME events
//!   (a second QMP monitor added by a wrapper around QEMU, as `bench
//!   pause` does): p50, p99, max, checkpoints per second;
//! - **throughput**: bytes the primary's link socket had acknowledged
//!   (`ss -ti`, `bytes_acked`: TLS records included), MiB/s; and what the
//!   guest got dirtied, MiB/s;
//! - CPU of both tandemds (utime + stime), percent of one core: where TLS
//!   shows first;
//!
//! and once per link the initial copy (protect → protected, guest RAM over
//! the link), MiB/s of guest RAM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use super::cluster::{
    beside_lab, block_on, check_interrupted, cpu_ms, free_port, install_signal_handlers, pct,
    run_bounded, sleep, stop_child, tail, wait_for,
};

const VM: &str = "tlsbench";
const READY: &str = "TANDEM-GUEST-READY";
/// The guest service's `DIRTY` buffer: 8192 pages of 4 KiB.
const DIRTY_BUFFER_PAGES: u64 = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    Tcp,
    Tls,
}

impl std::str::FromStr for Link {
    type Err = String;
    fn from_str(s: &str) -> Result<Link, String> {
        match s {
            "tcp" => Ok(Link::Tcp),
            "tls" => Ok(Link::Tls),
            _ => Err(format!("`{s}`: the links are tcp and tls")),
        }
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Tcp => "tcp",
            Link::Tls => "tls",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub memory_mib: u32,
    pub epoch_ms: u64,
    pub dirty_mib_s: Vec<u64>,
    pub seconds: u64,
    pub rounds: u32,
    pub links: Vec<Link>,
    pub qemu: PathBuf,
    pub tandemd: PathBuf,
    pub image_dir: PathBuf,
    pub work_dir: PathBuf,
}

/// One link at one dirty rate, over all rounds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    pub pause_p50_ms: f64,
    pub pause_p99_ms: f64,
    pub pause_max_ms: f64,
    pub checkpoints: usize,
    pub checkpoints_per_s: f64,
    /// Acknowledged bytes on the primary's link socket, MiB/s.
    pub link_mib_s: f64,
    /// Guest memory the load got dirtied, MiB/s.
    pub dirtied_mib_s: f64,
    pub primary_cpu_pct: f64,
    pub backup_cpu_pct: f64,
    /// tandemd's own pause p50/p99 (`ft status`, its last 1024 epochs) at
    /// the end of the window, as a cross-check.
    pub reported_p50_ms: f64,
    pub reported_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub dirty_mib_s: u64,
    pub sides: Vec<(Link, Side)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub memory_mib: u32,
    pub epoch_ms: u64,
    pub seconds: u64,
    pub rounds: u32,
    pub rows: Vec<Row>,
    /// Per link: initial copy, MiB of guest RAM per second (median of rounds).
    pub initial_copy_mib_s: Vec<(Link, f64)>,
}

/// Raw samples of one link at one dirty rate, summed over rounds.
#[derive(Debug, Default, Clone)]
struct Samples {
    pauses: Vec<f64>,
    window_s: f64,
    link_bytes: u64,
    dirtied_pages: u64,
    cpu_a_ms: f64,
    cpu_b_ms: f64,
    reported: Vec<(f64, f64)>,
}

impl Samples {
    fn side(&self) -> Side {
        let w = self.window_s.max(1e-9);
        Side {
            pause_p50_ms: pct(&self.pauses, 50.0),
            pause_p99_ms: pct(&self.pauses, 99.0),
            pause_max_ms: self.pauses.iter().copied().fold(0.0, f64::max),
            checkpoints: self.pauses.len(),
            checkpoints_per_s: self.pauses.len() as f64 / w,
            link_mib_s: self.link_bytes as f64 / (1 << 20) as f64 / w,
            dirtied_mib_s: self.dirtied_pages as f64 * 4096.0 / (1 << 20) as f64 / w,
            primary_cpu_pct: self.cpu_a_ms / (w * 10.0),
            backup_cpu_pct: self.cpu_b_ms / (w * 10.0),
            reported_p50_ms: pct(&self.reported.iter().map(|r| r.0).collect::<Vec<_>>(), 50.0),
            reported_p99_ms: pct(&self.reported.iter().map(|r| r.1).collect::<Vec<_>>(), 50.0),
        }
    }
}

// ------------------------------------------------------------ processes

/// A tandemd of this bench; stopped (with its QEMU) on drop.
struct Daemon {
    socket: PathBuf,
    state: PathBuf,
    ram_dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Daemon {
    fn start(o: &Options, dir: &Path, name: &str, extra: &[&str]) -> anyhow::Result<Daemon> {
        let socket = dir.join(format!("{name}.sock"));
        let state = dir.join(name);
        let ram_dir = PathBuf::from(format!(
            "/dev/shm/{}-{name}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("ttls")
        ));
        let log = dir.join(format!("tandemd-{name}.log"));
        let child = Command::new(&o.tandemd)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .arg("--ram-dir")
            .arg(&ram_dir)
            .arg("--image-dir")
            .arg(&o.image_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()
            .context("starting tandemd")?;
        let mut d = Daemon {
            socket,
            state,
            ram_dir,
            log,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&d.socket).is_err() {
            check_interrupted()?;
            if let Ok(Some(st)) = d.child.try_wait() {
                bail!("tandemd {name} exited ({st}): {}", tail(&d.log, 12));
            }
            if Instant::now() > deadline {
                bail!("tandemd {name} did not start: {}", tail(&d.log, 12));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(d)
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let c = tandem_api::Client::new(&self.socket);
        Ok(block_on(c.get::<Value>(path))?)
    }

    fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let c = tandem_api::Client::new(&self.socket);
        block_on(c.post::<Value, Value>(path, &body))
            .with_context(|| format!("POST {path}; tandemd log:\n{}", tail(&self.log, 12)))
    }

    fn ft(&self, role: &str) -> Option<Value> {
        let v = self.get(&format!("/v1/ft/{VM}")).ok()?;
        v.as_array()?.iter().find(|s| s["role"] == role).cloned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let c = tandem_api::Client::new(&self.socket);
        let _ = block_on(c.delete::<Value>(&format!("/v1/vms/{VM}")));
        stop_child(&mut self.child, Duration::from_secs(10));
        // Whatever QEMU this daemon ran must not outlive the bench.
        for pid in qemus_of(&self.state) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(&self.ram_dir);
    }
}

/// QEMUs whose command line names `state` (a daemon's state directory).
fn qemus_of(state: &Path) -> Vec<i32> {
    let needle = state.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("qemu-system") && c.contains(&needle)
            })
        })
        .collect()
}

/// The run's directory; removed on drop (after the daemons, declared later).
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ------------------------------------------------------------ QMP events

/// STOP/RESUME events of the primary QEMU (QEMU's timestamps), read by a
/// thread from a second QMP monitor until dropped.
struct Events {
    stop: Arc<AtomicBool>,
    events: Arc<Mutex<Vec<(bool, f64)>>>,
    failed: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Events {
    fn connect(path: &Path) -> anyhow::Result<Events> {
        let s = wait_for(
            "the bench's QMP monitor",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || UnixStream::connect(path).ok(),
        )?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).context("QMP greeting")?;
        if !line.contains("\"QMP\"") {
            bail!("unexpected QMP greeting {line:?}");
        }
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(None));
        let (flag, evs, fail) = (stop.clone(), events.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut line = String::new();
            let hard_stop = Instant::now() + Duration::from_secs(6 * 3600);
            while !flag.load(Ordering::SeqCst) && Instant::now() < hard_stop {
                match r.read_line(&mut line) {
                    Ok(0) => {
                        *fail.lock().unwrap() = Some("QMP closed (QEMU exited?)".into());
                        return;
                    }
                    Ok(_) => {
                        let msg = std::mem::take(&mut line);
                        let Ok(v) = serde_json::from_str::<Value>(&msg) else {
                            continue;
                        };
                        let stop = match v["event"].as_str() {
                            Some("STOP") => true,
                            Some("RESUME") => false,
                            _ => continue,
                        };
                        let ts = &v["timestamp"];
                        let at = ts["seconds"].as_f64().unwrap_or(0.0)
                            + ts["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
                        evs.lock().unwrap().push((stop, at));
                    }
                    // The read timeout (a partial line stays in `line`).
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => {
                        *fail.lock().unwrap() = Some(format!("reading QMP: {e}"));
                        return;
                    }
                }
            }
        });
        Ok(Events {
            stop,
            events,
            failed,
            thread: Some(thread),
        })
    }

    /// Pauses (ms) whose STOP falls in `from..to` (unix seconds).
    fn pauses_between(&self, from: f64, to: f64) -> anyhow::Result<Vec<f64>> {
        if let Some(e) = self.failed.lock().unwrap().clone() {
            bail!("the primary QEMU's events: {e}");
        }
        Ok(pauses_between(&self.events.lock().unwrap(), from, to))
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pauses_between(events: &[(bool, f64)], from: f64, to: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut stopped: Option<f64> = None;
    for &(stop, at) in events {
        if stop {
            stopped = Some(at);
        } else if let Some(s) = stopped.take() {
            if s >= from && s < to {
                out.push((at - s) * 1e3);
            }
        }
    }
    out
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ------------------------------------------------------------ load, link

/// One request to the guest service at `port`; the reply line.
fn request(port: u16, line: &str, timeout: Duration) -> anyhow::Result<String> {
    let s = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    (&s).write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    Ok(reply.trim_end().to_string())
}

/// The paced dirtying client: `DIRTY pages` once per period on one
/// connection, no catch-up after a stall; pages done counted.
struct Load {
    stop: Arc<AtomicBool>,
    pages: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Load {
    fn start(port: u16, pages: u64, period: Duration) -> anyhow::Result<Load> {
        let s = std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_secs(10),
        )
        .context("connecting to the guest service")?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let mut r = BufReader::new(s.try_clone()?);
            let mut w = s;
            let mut line = String::new();
            let mut next = Instant::now();
            let hard_stop = Instant::now() + Duration::from_secs(3600);
            while !flag.load(Ordering::SeqCst) && Instant::now() < hard_stop {
                writeln!(w, "DIRTY {pages}")?;
                line.clear();
                r.read_line(&mut line).context("waiting for DIRTIED")?;
                if !line.starts_with("DIRTIED") {
                    bail!("the guest answered {:?} to DIRTY {pages}", line.trim());
                }
                count.fetch_add(pages, Ordering::SeqCst);
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            Ok(())
        });
        Ok(Load {
            stop,
            pages: done,
            thread,
        })
    }

    fn finish(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow!("the load thread panicked"))?
    }
}

/// Pages per `DIRTY` request for `mib_s` at one request per epoch.
fn pages_per_epoch(mib_s: u64, epoch_ms: u64) -> u64 {
    (mib_s * 256 * epoch_ms / 1000).clamp(1, DIRTY_BUFFER_PAGES)
}

/// Bytes acknowledged on the TCP connections to 127.0.0.1:`port` (the
/// primary's end of the replication link), from `ss -ti`.
fn link_bytes_acked(port: u16) -> anyhow::Result<u64> {
    let out = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .stderr(Stdio::null())
        .output()
        .context("running ss")?;
    if !out.status.success() {
        bail!("ss: {}", out.status);
    }
    Ok(sum_bytes_acked(&String::from_utf8_lossy(&out.stdout)))
}

fn sum_bytes_acked(ss: &str) -> u64 {
    ss.split_whitespace()
        .filter_map(|w| w.strip_prefix("bytes_acked:"))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

// ------------------------------------------------------------ the run

/// The standalone pair's identities and B's peer list (made once per run).
struct Pair {
    a: PathBuf,
    b: PathBuf,
    peers: PathBuf,
}

fn make_pair(dir: &Path) -> anyhow::Result<Pair> {
    let pair = dir.join("pair");
    let mut cmd = Command::new(beside_lab("tandem")?);
    cmd.args(["cluster", "init", "--standalone", "host-a", "host-b"])
        .arg("--state-dir")
        .arg(&pair);
    let (st, _, err) = run_bounded(cmd, dir, Duration::from_secs(60))?;
    if !st.success() {
        bail!("tandem cluster init --standalone: {st}: {}", err.trim());
    }
    let peers = dir.join("peers.toml");
    std::fs::write(&peers, "[[peer]]\nname = \"host-a\"\nvms = [\"*\"]\n")?;
    Ok(Pair {
        a: pair.join("hosts/host-a"),
        b: pair.join("hosts/host-b"),
        peers,
    })
}

pub fn run(o: &Options, mut say: impl FnMut(&str)) -> anyhow::Result<Report> {
    for f in ["vmlinux", "initrd.img"] {
        if !o.image_dir.join(f).is_file() {
            bail!(
                "guest image {} missing: run images/build.sh",
                o.image_dir.join(f).display()
            );
        }
    }
    if !o.tandemd.is_file() {
        bail!("tandemd not found at {}", o.tandemd.display());
    }
    if o.links.is_empty() || o.dirty_mib_s.is_empty() || o.rounds == 0 {
        bail!("--link, --dirty and --rounds must not be empty or zero");
    }
    install_signal_handlers();
    let work = WorkDir(o.work_dir.join(format!("ttls-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&work.0);
    std::fs::create_dir_all(&work.0)?;
    let pair = if o.links.contains(&Link::Tls) {
        Some(make_pair(&work.0)?)
    } else {
        None
    };
    let mut samples: Vec<Vec<Samples>> =
        vec![vec![Samples::default(); o.links.len()]; o.dirty_mib_s.len()];
    let mut copies: Vec<Vec<f64>> = vec![Vec::new(); o.links.len()];
    for round in 0..o.rounds {
        // Alternate the order, so neither link always runs on a cooler machine.
        let mut order: Vec<usize> = (0..o.links.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for li in order {
            let link = o.links[li];
            say(&format!("round {}/{}: {link}", round + 1, o.rounds));
            let dir = work.0.join(format!("r{round}-{link}"));
            let copy = one_link(o, link, pair.as_ref(), &dir, &mut samples, li, &mut say)
                .with_context(|| format!("round {}, link {link}", round + 1))?;
            copies[li].push(copy);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let rows = o
        .dirty_mib_s
        .iter()
        .zip(&samples)
        .map(|(&d, per_link)| Row {
            dirty_mib_s: d,
            sides: o
                .links
                .iter()
                .zip(per_link)
                .map(|(&l, s)| (l, s.side()))
                .collect(),
        })
        .collect();
    Ok(Report {
        memory_mib: o.memory_mib,
        epoch_ms: o.epoch_ms,
        seconds: o.seconds,
        rounds: o.rounds,
        rows,
        initial_copy_mib_s: o
            .links
            .iter()
            .zip(&copies)
            .map(|(&l, c)| (l, pct(c, 50.0)))
            .collect(),
    })
}

/// One pair of tandemds on `link`: boot, protect, one window per dirty
/// rate. Returns the initial copy's MiB/s.
fn one_link(
    o: &Options,
    link: Link,
    pair: Option<&Pair>,
    dir: &Path,
    samples: &mut [Vec<Samples>],
    li: usize,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    // tandemd's QEMU with a second QMP monitor for the bench (tandemd also
    // runs the binary for `--version` and `-machine help`: left alone).
    let events = dir.join("ev.sock");
    let wrapper = dir.join("qemu-with-events");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in\n  *\" -mon \"*) exec '{q}' \"$@\" -chardev socket,id=bench-events,path='{e}',server=on,wait=off -mon chardev=bench-events,mode=control ;;\nesac\nexec '{q}' \"$@\"\n",
            q = o.qemu.display(),
            e = events.display(),
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let wrapper_s = wrapper.to_string_lossy().into_owned();
    // Generous fencing: the initial copy on a busy 2-core machine must not
    // be taken for a dead primary; failure detection is not measured here.
    let timeouts = [
        "--ft-fence-timeout-ms",
        "5000",
        "--ft-takeover-timeout-ms",
        "7500",
    ];
    let mut b_args: Vec<String> = timeouts.iter().map(|s| s.to_string()).collect();
    b_args.extend(["--repl-listen".into(), listen.clone()]);
    if matches!(link, Link::Tcp) {
        // The side-by-side baseline: plain TCP, by explicit opt-in.
        b_args.push("--repl-unauthenticated".into());
    }
    let mut a_args: Vec<String> = timeouts.iter().map(|s| s.to_string()).collect();
    a_args.extend(["--qemu".into(), wrapper_s]);
    let backup = match (link, pair) {
        (Link::Tls, Some(p)) => {
            b_args.extend([
                "--identity-dir".into(),
                p.b.to_string_lossy().into_owned(),
                "--repl-peers".into(),
                p.peers.to_string_lossy().into_owned(),
            ]);
            a_args.extend(["--identity-dir".into(), p.a.to_string_lossy().into_owned()]);
            format!("host-b@{listen}")
        }
        (Link::Tls, None) => bail!("no standalone pair for the tls link"),
        (Link::Tcp, _) => listen.clone(),
    };
    let b_refs: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let a_refs: Vec<&str> = a_args.iter().map(String::as_str).collect();
    // Drop order (reverse of declaration): A first.
    let b = Daemon::start(o, dir, "b", &b_refs)?;
    let a = Daemon::start(o, dir, "a", &a_refs)?;
    let gport = free_port()?;
    let spec = format!(
        r#"name = "{VM}"
memory_mib = {mem}
accelerator = "tcg"
shutdown_timeout_s = 5
[boot]
kernel = "{k}"
initrd = "{i}"
cmdline = "console=ttyS0 loglevel=4 tandem.ip=10.0.2.15/24 tandem.gw=10.0.2.2"
[[nics]]
name = "eth0"
mac = "52:54:00:77:00:40"
backend = "user"
host_forwards = [{{ host_port = {gport}, guest_port = 7070 }}]
"#,
        mem = o.memory_mib,
        k = o.image_dir.join("vmlinux").display(),
        i = o.image_dir.join("initrd.img").display(),
    );
    a.post("/v1/vms", json!({ "spec_toml": spec }))?;
    a.post(&format!("/v1/vms/{VM}/start"), json!({}))?;
    wait_for(
        "the guest's boot",
        Duration::from_secs(180),
        Duration::from_millis(100),
        || {
            let c = a.get(&format!("/v1/vms/{VM}/console?offset=0")).ok()?;
            c["data"].as_str()?.contains(READY).then_some(())
        },
    )
    .with_context(|| format!("tandemd A:\n{}", tail(&a.log, 12)))?;
    // Warm-up: the service answers, and the whole buffer is touched once,
    // so no window replicates first-touch allocation.
    wait_for(
        "the guest service",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || (request(gport, "PING", Duration::from_secs(2)).ok()? == "PONG").then_some(()),
    )?;
    let r = request(
        gport,
        &format!("DIRTY {DIRTY_BUFFER_PAGES}"),
        Duration::from_secs(60),
    )?;
    if !r.starts_with("DIRTIED") {
        bail!("the guest answered {r:?} to DIRTY");
    }
    say(&format!("  {link}: protecting to {backup}"));
    let t = Instant::now();
    a.post(
        &format!("/v1/vms/{VM}/protect"),
        json!({ "backup": backup, "epoch_ms": o.epoch_ms }),
    )?;
    wait_for(
        "protection",
        Duration::from_secs(300),
        Duration::from_millis(20),
        || {
            let s = a.ft("primary")?;
            (s["state"] == "protected" && s["last_committed"].as_u64()? >= 1).then_some(())
        },
    )
    .with_context(|| format!("tandemd A:\n{}", tail(&a.log, 12)))?;
    let copy_mib_s = f64::from(o.memory_mib) / t.elapsed().as_secs_f64();
    wait_for(
        "the backup's standby",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || (b.ft("backup")?["state"] == "standby").then_some(()),
    )?;
    if link == Link::Tls && !std::fs::read_to_string(&b.log)?.contains("host-a (host,") {
        bail!(
            "the backup does not name its primary by certificate: is the link TLS?\n{}",
            tail(&b.log, 12)
        );
    }
    let ev = Events::connect(&events)?;
    for (di, &dirty) in o.dirty_mib_s.iter().enumerate() {
        check_interrupted()?;
        // Settle: the change of load is not steady state.
        sleep(Duration::from_secs(1))?;
        let load = if dirty > 0 {
            Some(Load::start(
                gport,
                pages_per_epoch(dirty, o.epoch_ms),
                Duration::from_millis(o.epoch_ms),
            )?)
        } else {
            None
        };
        let base = load
            .as_ref()
            .map(|l| l.pages.load(Ordering::SeqCst))
            .unwrap_or(0);
        let (ca, cb) = (cpu_ms(a.child.id()), cpu_ms(b.child.id()));
        let bytes0 = link_bytes_acked(port)?;
        let (from, t0) = (now_s(), Instant::now());
        let slept = sleep(Duration::from_secs(o.seconds));
        let window = t0.elapsed().as_secs_f64();
        let to = now_s();
        let bytes1 = link_bytes_acked(port)?;
        let (ca1, cb1) = (cpu_ms(a.child.id()), cpu_ms(b.child.id()));
        let pages = load
            .as_ref()
            .map(|l| l.pages.load(Ordering::SeqCst) - base)
            .unwrap_or(0);
        let ended = load.map(Load::finish).unwrap_or(Ok(()));
        slept?;
        ended.context("the dirtying client")?;
        let st = a.ft("primary").context("the primary's ft status")?;
        if st["state"] != "protected" {
            bail!(
                "the guest left protection ({}): {}",
                st["state"],
                tail(&a.log, 12)
            );
        }
        let pauses = ev.pauses_between(from, to)?;
        if pauses.is_empty() {
            bail!("no STOP/RESUME pairs from the primary's QEMU in {window:.1} s");
        }
        let s = &mut samples[di][li];
        s.window_s += window;
        s.pauses.extend(&pauses);
        s.link_bytes += bytes1.saturating_sub(bytes0);
        s.dirtied_pages += pages;
        s.cpu_a_ms += ca1.zip(ca).map(|(x, y)| x - y).unwrap_or(0.0);
        s.cpu_b_ms += cb1.zip(cb).map(|(x, y)| x - y).unwrap_or(0.0);
        s.reported.push((
            st["pause_p50_ms"].as_f64().unwrap_or(0.0),
            st["pause_p99_ms"].as_f64().unwrap_or(0.0),
        ));
        say(&format!(
            "  {link} {dirty} MiB/s: pause p50 {:.1} ms p99 {:.1} ms, {:.1} ckpt/s, link {:.1} MiB/s",
            pct(&pauses, 50.0),
            pct(&pauses, 99.0),
            pauses.len() as f64 / window,
            bytes1.saturating_sub(bytes0) as f64 / (1 << 20) as f64 / window
        ));
    }
    drop(ev);
    let _ = a.post(&format!("/v1/vms/{VM}/unprotect"), json!({}));
    drop(a);
    drop(b);
    Ok(copy_mib_s)
}

pub fn print(o: &Options, r: &Report) {
    println!(
        "\nreplication link: {} side by side, 127.0.0.1, guest {} MiB (TCG, no disk), epoch {} ms, {} s per window, {} round(s) (order alternates)",
        o.links
            .iter()
            .map(Link::to_string)
            .collect::<Vec<_>>()
            .join(" vs "),
        r.memory_mib,
        r.epoch_ms,
        r.seconds,
        r.rounds
    );
    println!(
        "{:>6} {:>5} | {:>19} {:>8} {:>7} | {:>8} {:>8} | {:>7} {:>7} | {:>15}",
        "dirty",
        "link",
        "pause p50 / p99 ms",
        "max ms",
        "ckpt/s",
        "link MiB/s",
        "dirtied",
        "A cpu%",
        "B cpu%",
        "ft status p50/p99"
    );
    for row in &r.rows {
        for (l, s) in &row.sides {
            println!(
                "{:>6} {:>5} | {:>8.2} / {:>8.2} {:>8.2} {:>7.1} | {:>10.2} {:>8.2} | {:>7.1} {:>7.1} | {:>7.2} / {:>5.2}",
                row.dirty_mib_s,
                l.to_string(),
                s.pause_p50_ms,
                s.pause_p99_ms,
                s.pause_max_ms,
                s.checkpoints_per_s,
                s.link_mib_s,
                s.dirtied_mib_s,
                s.primary_cpu_pct,
                s.backup_cpu_pct,
                s.reported_p50_ms,
                s.reported_p99_ms
            );
        }
    }
    let tcp = o.links.iter().position(|l| *l == Link::Tcp);
    let tls = o.links.iter().position(|l| *l == Link::Tls);
    if let (Some(i), Some(j)) = (tcp, tls) {
        println!("tls / tcp:");
        for row in &r.rows {
            let (a, b) = (&row.sides[i].1, &row.sides[j].1);
            let q = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
            println!(
                "{:>6} MiB/s: pause p50 {:.2}, p99 {:.2}; link MiB/s {:.2}; checkpoints/s {:.2}; CPU A {:.2}, B {:.2}",
                row.dirty_mib_s,
                q(b.pause_p50_ms, a.pause_p50_ms),
                q(b.pause_p99_ms, a.pause_p99_ms),
                q(b.link_mib_s, a.link_mib_s),
                q(b.checkpoints_per_s, a.checkpoints_per_s),
                q(b.primary_cpu_pct, a.primary_cpu_pct),
                q(b.backup_cpu_pct, a.backup_cpu_pct)
            );
        }
    }
    for (l, c) in &r.initial_copy_mib_s {
        println!("initial copy ({l}): {c:.1} MiB of guest RAM per second (protect → protected, median of rounds)");
    }
    println!("(dirty: offered MiB/s, one DIRTY per epoch; dirtied: what the guest got done; pause from the primary QEMU's STOP/RESUME events; link: bytes the primary's socket had acknowledged (ss -ti), TLS records included; cpu%: utime+stime of each tandemd, % of one core)");
    println!(
        "reproduce: tandem bench tls --memory-mib {} --epoch-ms {} --dirty {} --seconds {} --rounds {} --link {}",
        o.memory_mib,
        o.epoch_ms,
        o.dirty_mib_s
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        o.seconds,
        o.rounds,
        o.links
            .iter()
            .map(Link::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_pair_a_stop_with_the_next_resume_inside_the_window() {
        let ev = [
            (true, 9.0),
            (false, 9.5),
            (true, 10.0),
            (false, 10.002),
            (true, 11.0),
            (false, 11.010),
            (true, 12.5),
        ];
        let p = pauses_between(&ev, 10.0, 12.0);
        assert_eq!(p.len(), 2);
        assert!((p[0] - 2.0).abs() < 1e-6 && (p[1] - 10.0).abs() < 1e-6);
    }

    #[test]
    fn bytes_acked_are_summed_over_connections() {
        let ss = "ESTAB 0 0 127.0.0.1:5 127.0.0.1:7\n\t cubic bytes_sent:10 bytes_acked:7 bytes_received:3\nESTAB 0 0 x y\n\t bytes_acked:5 segs_out:1";
        assert_eq!(sum_bytes_acked(ss), 12);
    }

    #[test]
    fn links_parse_and_print() {
        assert_eq!("tls".parse::<Link>().unwrap().to_string(), "tls");
        assert!("udp".parse::<Link>().is_err());
        assert_eq!(pages_per_epoch(16, 50), 204);
    }
}
