//! `tandem bench pause`: the epoch pause of tandem against QEMU's own COLO
//! checkpointing, on the same guest, side by side in one run.
//!
//! Each cell (guest RAM × dirty rate) runs both systems one after the other,
//! in a network namespace made for the run (loopback only, deleted on every
//! exit path):
//!
//! - **tandem**: two tandemds (primary and backup, replication over a unix
//!   socket), the guest protected with the `scan` tracker. tandemd's QEMU is
//!   started through a wrapper that adds a second QMP monitor, so the bench
//!   sees QEMU's own events without disturbing tandemd's connection.
//! - **COLO**: a primary QEMU and a secondary QEMU (`-incoming`), capability
//!   `x-colo` on both, `x-checkpoint-delay` = the epoch, migration over a
//!   unix socket until the primary reaches state `colo`. Periodic
//!   checkpoints only: no colo-compare, no disk (the guest has none).
//!
//! The pause is measured the same way for both: on the primary QEMU, from
//! each QMP `STOP` event to the next `RESUME` (QEMU's own timestamps). tandem
//! stops the guest with QMP `stop` and resumes it with `cont`; COLO stops it
//! in its checkpoint and restarts it once the secondary has loaded the
//! checkpoint. tandem's own statistics (`ft status`) are reported beside as
//! a cross-check.
//!
//! The load is the guest service's `DIRTY n`, sent once per epoch from the
//! namespace through QEMU's user-mode port forward: each request rewrites
//! the same first `n` pages of a 32 MiB buffer, so about `n` pages are dirty
//! in every epoch.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::{block_on, exchange_at, stats_ms, tail, topology, wait_for, DrillOptions, Host, Rng};

/// The guest service's `DIRTY` buffer: 8192 pages of 4 KiB.
const DIRTY_BUFFER_PAGES: u64 = 8192;
/// Host ports of the guest service (inside the run's own namespace).
const TANDEM_PORT: u16 = 17071;
const COLO_PORT: u16 = 17072;
const GUEST_CMDLINE: &str = "console=ttyS0 loglevel=4 tandem.ip=10.0.2.15/24 tandem.gw=10.0.2.2";
const READY: &str = "TANDEM-GUEST-READY";
/// A pause this long means the checkpointing is stuck.
const STALL: Duration = Duration::from_secs(5);
/// COLO under TCG sometimes loses its secondary mid-run; a cell tries it
/// this many times before giving up (failed attempts are reported).
const COLO_ATTEMPTS: usize = 3;

#[derive(Debug, Clone)]
pub struct PauseOptions {
    pub memory_mib: Vec<u32>,
    pub epoch_ms: u64,
    /// Guest memory dirtied per second, MiB/s (0: idle guest).
    pub dirty_mib_s: Vec<u64>,
    /// Measurement window per system and cell.
    pub seconds: u64,
    /// Chooses which system runs first in each cell.
    pub seed: u64,
    pub tandemd: PathBuf,
    /// The QEMU tandemd runs the guest on.
    pub qemu: PathBuf,
    /// The QEMU that runs COLO (see qemu-scripts/colo-qemu.sh).
    pub colo_qemu: PathBuf,
    /// LD_PRELOAD for the COLO QEMUs (qemu-scripts/colo-bql-shim.c).
    pub colo_shim: Option<PathBuf>,
    pub image_dir: PathBuf,
    pub work_dir: PathBuf,
}

/// One system in one cell.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SideResult {
    pub pause_p50_ms: f64,
    pub pause_p99_ms: f64,
    pub pause_max_ms: f64,
    /// Checkpoints (STOP→RESUME pairs) inside the window.
    pub checkpoints: usize,
    pub checkpoints_per_s: f64,
    /// Guest memory the load actually dirtied, MiB per second of wall time
    /// (a guest that is paused more gets less done).
    pub dirtied_mib_s: f64,
    /// Set when this system could not be measured in this cell (the other
    /// numbers are then zero).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// COLO only: why earlier attempts at this cell failed (retried).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed_attempts: Vec<String>,
    /// tandem only: its own pause statistics (`tandem ft status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_epochs_per_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PauseRow {
    pub memory_mib: u32,
    pub dirty_mib_s: u64,
    /// `tandem` or `colo`: which ran first in this cell.
    pub first: String,
    pub tandem: SideResult,
    pub colo: SideResult,
    /// tandem / COLO (below 1: tandem pauses less).
    pub ratio_p50: f64,
    pub ratio_p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PauseReport {
    pub tandem_qemu: String,
    pub colo_qemu: String,
    pub colo_shim: Option<PathBuf>,
    pub epoch_ms: u64,
    pub seconds: u64,
    pub rows: Vec<PauseRow>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM end the run through the normal error path, so every
/// QEMU and daemon is killed and the namespace deleted.
fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// First line of `qemu --version`.
pub fn qemu_version(qemu: &Path) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| format!("{} (version unknown)", qemu.display()))
}

/// A QEMU binary's own firmware directory (`BIN/../share/qemu`), if any.
fn data_dir(qemu: &Path) -> Option<PathBuf> {
    let d = qemu.parent()?.parent()?.join("share/qemu");
    d.join("qboot.rom").is_file().then_some(d)
}

// ---------------------------------------------------------------- QMP

#[derive(Debug, Clone, Copy)]
struct PauseEvent {
    stop: bool,
    /// QEMU's timestamp, seconds since the epoch.
    at: f64,
}

/// A minimal blocking QMP client: commands, and the STOP/RESUME events
/// that arrive in between.
struct Qmp {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
    partial: String,
    events: Vec<PauseEvent>,
    what: String,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration, what: &str) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            check_interrupted()?;
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e)
                        .with_context(|| format!("{what}: connecting to QMP {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut q = Qmp {
            rd: BufReader::new(s.try_clone()?),
            wr: s,
            partial: String::new(),
            events: Vec::new(),
            what: what.to_string(),
        };
        let t = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = q.read_msg()? {
                if m.get("QMP").is_none() {
                    bail!("{what}: unexpected QMP greeting {m}");
                }
                break;
            }
            if Instant::now() > t {
                bail!("{what}: no QMP greeting within 10 s");
            }
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// One message, or `None` when nothing arrived within the read timeout.
    fn read_msg(&mut self) -> anyhow::Result<Option<Value>> {
        match self.rd.read_line(&mut self.partial) {
            Ok(0) => bail!("{}: QMP connection closed (QEMU exited?)", self.what),
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                let v: Value = serde_json::from_str(&line)
                    .with_context(|| format!("{}: bad QMP message {line:?}", self.what))?;
                if let Some(name) = v.get("event").and_then(Value::as_str) {
                    if name == "STOP" || name == "RESUME" {
                        let ts = &v["timestamp"];
                        let at = ts["seconds"].as_f64().unwrap_or(0.0)
                            + ts["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
                        self.events.push(PauseEvent {
                            stop: name == "STOP",
                            at,
                        });
                    }
                }
                Ok(Some(v))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("{}: reading QMP", self.what)),
        }
    }

    fn execute(&mut self, cmd: &str, args: Value) -> anyhow::Result<Value> {
        writeln!(self.wr, "{}", json!({"execute": cmd, "arguments": args}))
            .with_context(|| format!("{}: sending {cmd}", self.what))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(m) = self.read_msg()? {
                if let Some(r) = m.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = m.get("error") {
                    bail!(
                        "{}: QMP {cmd}: {}",
                        self.what,
                        e.get("desc").and_then(Value::as_str).unwrap_or("error")
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: QMP {cmd} not answered within 20 s (QEMU hung?)",
                    self.what
                );
            }
        }
    }

    /// Reads (and records) events until `until`. Fails if the guest stays
    /// stopped for [`STALL`]: a checkpoint that never ends (a COLO
    /// secondary that failed leaves its primary stopped for good: COLO
    /// has no heartbeat).
    fn collect_until(&mut self, until: Instant) -> anyhow::Result<()> {
        let mut last = (self.events.len(), Instant::now());
        while Instant::now() < until {
            check_interrupted()?;
            self.read_msg()?;
            if self.events.len() != last.0 {
                last = (self.events.len(), Instant::now());
            } else if self.events.last().is_some_and(|e| e.stop) && last.1.elapsed() > STALL {
                bail!(
                    "{}: the guest has been stopped for over {STALL:?} (a checkpoint that never ends)",
                    self.what
                );
            }
        }
        Ok(())
    }
}

/// Pauses (ms) whose STOP and RESUME both fall in `[from, to]`.
fn pauses_between(events: &[PauseEvent], from: f64, to: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut stopped = None;
    for e in events {
        if e.stop {
            stopped = Some(e.at);
        } else if let Some(s) = stopped.take() {
            if s >= from && e.at <= to {
                out.push((e.at - s) * 1e3);
            }
        }
    }
    out
}

fn summarize(mut pauses: Vec<f64>, window_s: f64, dirtied_pages: u64) -> SideResult {
    SideResult {
        checkpoints: pauses.len(),
        checkpoints_per_s: pauses.len() as f64 / window_s,
        pause_p50_ms: stats_ms(&mut pauses, 50.0),
        pause_p99_ms: stats_ms(&mut pauses, 99.0),
        pause_max_ms: pauses.last().copied().unwrap_or(0.0),
        dirtied_mib_s: dirtied_pages as f64 * 4096.0 / (1 << 20) as f64 / window_s,
        ..SideResult::default()
    }
}

// ---------------------------------------------------------------- load

/// The dirtying client: `DIRTY pages` once per epoch on one connection.
struct Load {
    stop: Arc<AtomicBool>,
    pages: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>,
}

impl Load {
    fn start(ns: &str, port: u16, pages: u64, period: Duration) -> anyhow::Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), done.clone());
        let thread = topology::spawn_in_ns(ns, move || -> anyhow::Result<()> {
            let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .context("connecting to the guest service")?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
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
                    // Behind (the guest was paused): no catch-up burst.
                    next = now;
                }
            }
            Ok(())
        })?;
        Ok(Load {
            stop,
            pages: done,
            thread,
        })
    }

    /// Stops the client and reports how it ended.
    fn finish(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow!("the load thread panicked"))??
    }
}

/// Pages per `DIRTY` request for `mib_s` at one request per epoch.
fn pages_per_epoch(mib_s: u64, epoch_ms: u64) -> u64 {
    (mib_s * 256 * epoch_ms / 1000).clamp(1, DIRTY_BUFFER_PAGES)
}

/// Runs the load (if any) while `qmp` collects events for `seconds`;
/// returns the window's pauses and the pages dirtied in it.
fn measure(
    qmp: &mut Qmp,
    ns: &str,
    port: u16,
    o: &PauseOptions,
    dirty_mib_s: u64,
) -> anyhow::Result<(Vec<f64>, f64, u64)> {
    // Settle: the first checkpoints after the start are not steady state.
    qmp.collect_until(Instant::now() + Duration::from_secs(1))?;
    let load = if dirty_mib_s > 0 {
        Some(Load::start(
            ns,
            port,
            pages_per_epoch(dirty_mib_s, o.epoch_ms),
            Duration::from_millis(o.epoch_ms),
        )?)
    } else {
        None
    };
    let from = now_s();
    let t0 = Instant::now();
    let base = load
        .as_ref()
        .map(|l| l.pages.load(Ordering::SeqCst))
        .unwrap_or(0);
    let res = qmp.collect_until(t0 + Duration::from_secs(o.seconds));
    let window = t0.elapsed().as_secs_f64();
    let to = now_s();
    let pages = load
        .as_ref()
        .map(|l| l.pages.load(Ordering::SeqCst) - base)
        .unwrap_or(0);
    let ended = load.map(Load::finish).unwrap_or(Ok(()));
    res?;
    ended.context("the dirtying client")?;
    Ok((pauses_between(&qmp.events, from, to), window, pages))
}

// ---------------------------------------------------------------- tandem

fn run_tandem(
    o: &PauseOptions,
    ns: &str,
    work: &Path,
    mem: u32,
    dirty: u64,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<SideResult> {
    let dir = work.join(format!(
        "{}-t{mem}-{dirty}",
        work.file_name().and_then(|n| n.to_str()).unwrap_or("tcolo")
    ));
    std::fs::create_dir_all(&dir)?;
    // tandemd's QEMU, with a second QMP monitor for the bench's events
    // (tandemd also calls the binary for `--version`: left alone).
    let events = dir.join("bench-events.sock");
    let wrapper = dir.join("qemu-with-events");
    let data = data_dir(&o.qemu)
        .map(|d| format!(" -L '{}'", d.display()))
        .unwrap_or_default();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in\n  *\" -mon \"*) exec '{q}' \"$@\"{data} -chardev socket,id=bench-events,path='{e}',server=on,wait=off -mon chardev=bench-events,mode=control ;;\nesac\nexec '{q}' \"$@\"\n",
            q = o.qemu.display(),
            e = events.display(),
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let opts = DrillOptions {
        rounds: 1,
        kill: None,
        seed: o.seed,
        epoch_ms: o.epoch_ms,
        memory_mib: mem,
        output: "classified".into(),
        profile: "bulk-tcp".into(),
        unsafe_no_clamp: false,
        tandemd: o.tandemd.clone(),
        image_dir: o.image_dir.clone(),
        work_dir: o.work_dir.clone(),
        // Generous fencing: the initial copy of a 512 MiB guest, applied
        // by a backup on a busy 2-core machine, can starve heartbeats past
        // the default 1.5 s, and a fenced guest measures nothing. Failure
        // detection is not what this bench measures.
        timeouts: crate::FtTimeouts {
            heartbeat_ms: 100,
            fence_timeout_ms: 5000,
            takeover_timeout_ms: 7500,
        },
    };
    let repl = format!("unix:{}", dir.join("repl.sock").display());
    let owned = opts.timeouts.tandemd_args();
    let timeouts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let mut b_args = timeouts.to_vec();
    b_args.extend(["--repl-listen", repl.as_str()]);
    let wrapper_s = wrapper.to_string_lossy().into_owned();
    let qboot = data_dir(&o.qemu)
        .map(|d| d.join("qboot.rom").to_string_lossy().into_owned())
        .unwrap_or_else(|| "/usr/share/qemu/qboot.rom".into());
    let mut a_args = timeouts.to_vec();
    a_args.extend(["--qemu", wrapper_s.as_str(), "--qboot-rom", qboot.as_str()]);
    // Drop order (reverse of declaration): A (the primary) goes first.
    let b = Host::start_with_switch("b", ns, "", &opts, &dir, &b_args)?;
    let a = Host::start_with_switch("a", ns, "", &opts, &dir, &a_args)?;
    let spec = format!(
        r#"name = "drill"
memory_mib = {mem}
accelerator = "tcg"
shutdown_timeout_s = 5
[boot]
kernel = "{k}"
initrd = "{i}"
cmdline = "{GUEST_CMDLINE}"
[[nics]]
name = "eth0"
mac = "52:54:00:77:00:20"
backend = "user"
host_forwards = [{{ host_port = {TANDEM_PORT}, guest_port = 7070 }}]
"#,
        k = o.image_dir.join("vmlinux").display(),
        i = o.image_dir.join("initrd.img").display(),
    );
    let api = a.api();
    let _: tandem_api::VmInfo =
        block_on(api.post("/v1/vms", &tandem_api::CreateVmRequest { spec_toml: spec }))
            .context("defining the guest on tandemd")?;
    let _: tandem_api::VmInfo =
        block_on(api.post("/v1/vms/drill/start", &())).context("starting the guest")?;
    wait_for("guest ready (tandem)", Duration::from_secs(120), || {
        let c: tandem_api::ConsoleChunk =
            block_on(api.get("/v1/vms/drill/console?offset=0")).ok()?;
        c.data.contains(READY).then_some(())
    })
    .with_context(|| format!("tandemd A's log:\n{}", log_tail(&a.log, 6)))?;
    warm_up(ns, TANDEM_PORT)?;
    say("  tandem: protecting (scan tracker)");
    crate::protect_with(&a, &b, &repl, &opts, o.epoch_ms, Vec::new())
        .with_context(|| format!("protecting; tandemd A's log:\n{}", log_tail(&a.log, 6)))?;
    // Connected only now and read without pause from here on: an unread
    // monitor must not be able to hold QEMU up.
    let mut qmp = Qmp::connect(&events, Duration::from_secs(10), "tandem's QEMU")?;
    let (pauses, window, pages) = measure(&mut qmp, ns, TANDEM_PORT, o, dirty)?;
    drop(qmp);
    let st = crate::ft_primary(&a)?;
    if st.state.as_str() != "protected" {
        bail!(
            "the guest left protection during the run ({}): {}",
            st.state,
            log_tail(&a.log, 6)
        );
    }
    let unprotected: anyhow::Result<tandem_api::FtStatus> =
        block_on(api.post("/v1/vms/drill/unprotect", &())).map_err(Into::into);
    if let Err(e) = unprotected {
        say(&format!(
            "  tandem: unprotect failed ({e:#}); tearing down anyway"
        ));
    }
    if pauses.is_empty() {
        bail!("no STOP/RESUME pairs from tandem's QEMU in {window:.1} s");
    }
    let mut r = summarize(pauses, window, pages);
    r.reported_p50_ms = Some(st.pause_p50_ms);
    r.reported_p99_ms = Some(st.pause_p99_ms);
    r.reported_epochs_per_s = Some(st.epochs_per_s);
    drop(a);
    drop(b);
    Ok(r)
}

/// The last `n` lines of a daemon log, without terminal colour codes.
fn log_tail(path: &Path, n: usize) -> String {
    let mut out = String::new();
    let text = tail(path, n);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            // CSI: parameters up to the final byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Faults in the guest's whole dirty buffer before any checkpointing, so
/// neither system replicates first-touch allocation during the window.
fn warm_up(ns: &str, port: u16) -> anyhow::Result<()> {
    let addr = format!("127.0.0.1:{port}");
    topology::spawn_in_ns(ns, move || -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match exchange_at(&addr, "PING", Duration::from_secs(2)) {
                Ok(r) if r == "PONG" => break,
                _ if Instant::now() > deadline => {
                    bail!("the guest service is not reachable at {addr}")
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        let r = exchange_at(
            &addr,
            &format!("DIRTY {DIRTY_BUFFER_PAGES}"),
            Duration::from_secs(60),
        )?;
        if !r.starts_with("DIRTIED") {
            bail!("the guest answered {r:?} to DIRTY");
        }
        Ok(())
    })?
    .join()
    .map_err(|_| anyhow!("warm-up thread panicked"))??
}

// ---------------------------------------------------------------- COLO

/// The two COLO QEMUs; killed (and reaped) when dropped.
struct ColoPair {
    children: Vec<(Child, PathBuf)>,
}

impl ColoPair {
    fn spawn(
        &mut self,
        ns: &str,
        o: &PauseOptions,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<()> {
        let logf = std::fs::File::create(&log)?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "env"]);
        if let Some(shim) = &o.colo_shim {
            c.arg(format!("LD_PRELOAD={}", shim.display()));
        }
        c.arg(&o.colo_qemu)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(logf));
        // SAFETY: prctl(2) only, between fork and exec: QEMU dies with the
        // bench even if the bench is killed without unwinding.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = c
            .spawn()
            .with_context(|| format!("starting {}", o.colo_qemu.display()))?;
        self.children.push((child, log));
        Ok(())
    }

    /// Fails if a QEMU has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (c, log) in &mut self.children {
            if let Ok(Some(st)) = c.try_wait() {
                bail!("a COLO QEMU exited ({st}): {}", tail(log, 10));
            }
        }
        Ok(())
    }
}

impl Drop for ColoPair {
    fn drop(&mut self) {
        for (c, _) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_colo(
    o: &PauseOptions,
    ns: &str,
    dir: &Path,
    mem: u32,
    dirty: u64,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<SideResult> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let data = data_dir(&o.colo_qemu).ok_or_else(|| {
        anyhow!(
            "{} has no firmware directory beside it (../share/qemu/qboot.rom)",
            o.colo_qemu.display()
        )
    })?;
    let common = |role: &str| -> Vec<String> {
        [
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-m",
            &mem.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-L",
            &data.to_string_lossy(),
            "-bios",
            &data.join("qboot.rom").to_string_lossy(),
            "-kernel",
            &o.image_dir.join("vmlinux").to_string_lossy(),
            "-initrd",
            &o.image_dir.join("initrd.img").to_string_lossy(),
            "-append",
            GUEST_CMDLINE,
            "-device",
            "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:77:00:21",
            "-name",
            &format!("colo-{role}"),
            "-serial",
            &format!("file:{}", dir.join(format!("{role}.serial")).display()),
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                dir.join(format!("{role}.qmp")).display()
            ),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mig = dir.join("migration.sock");
    let mut primary_args = common("primary");
    primary_args.extend([
        "-netdev".to_string(),
        format!("user,id=n0,hostfwd=tcp:127.0.0.1:{COLO_PORT}-:7070"),
    ]);
    let mut secondary_args = common("secondary");
    secondary_args.extend([
        "-netdev".to_string(),
        "user,id=n0".to_string(),
        "-incoming".to_string(),
        format!("unix:{}", mig.display()),
    ]);
    let mut pair = ColoPair {
        children: Vec::new(),
    };
    pair.spawn(ns, o, &primary_args, dir.join("primary.log"))?;
    pair.spawn(ns, o, &secondary_args, dir.join("secondary.log"))?;
    let mut p = Qmp::connect(
        &dir.join("primary.qmp"),
        Duration::from_secs(20),
        "COLO primary",
    )
    .map_err(|e| pair.check_alive().err().unwrap_or(e))?;
    let mut s = Qmp::connect(
        &dir.join("secondary.qmp"),
        Duration::from_secs(20),
        "COLO secondary",
    )
    .map_err(|e| pair.check_alive().err().unwrap_or(e))?;
    let serial = dir.join("primary.serial");
    wait_for(
        "guest ready (COLO primary)",
        Duration::from_secs(120),
        || {
            if pair.check_alive().is_err() || INTERRUPTED.load(Ordering::SeqCst) {
                return Some(());
            }
            std::fs::read_to_string(&serial)
                .ok()?
                .contains(READY)
                .then_some(())
        },
    )?;
    pair.check_alive()?;
    check_interrupted()?;
    warm_up(ns, COLO_PORT)?;

    say("  COLO: migrating to the secondary");
    let colo = json!({"capabilities": [{"capability": "x-colo", "state": true}]});
    s.execute("migrate-set-capabilities", colo.clone())?;
    p.execute("migrate-set-capabilities", colo)?;
    p.execute(
        "migrate-set-parameters",
        json!({"x-checkpoint-delay": o.epoch_ms, "max-bandwidth": 1u64 << 40}),
    )?;
    p.execute("migrate", json!({"uri": format!("unix:{}", mig.display())}))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        check_interrupted()?;
        pair.check_alive()?;
        let st = p.execute("query-migrate", json!({}))?;
        match st.get("status").and_then(Value::as_str).unwrap_or("") {
            "colo" => break,
            "completed" => bail!(
                "{}: the migration ended `completed` instead of entering `colo`: COLO is broken in this QEMU (known for 10.0/10.1); use qemu-scripts/colo-qemu.sh",
                qemu_version(&o.colo_qemu)
            ),
            "failed" | "cancelled" => bail!(
                "COLO migration failed: {}",
                st.get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
            ),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("the primary did not reach COLO state within 120 s: {st}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (pauses, window, pages) = measure(&mut p, ns, COLO_PORT, o, dirty)?;
    // A primary that stopped answering is the 7.2 + TCG deadlock (without
    // the shim): its numbers would be meaningless.
    p.execute("query-status", json!({}))
        .context("the COLO primary after the window")?;
    let mode = s.execute("query-colo-status", json!({}))?;
    if mode.get("mode").and_then(Value::as_str) != Some("secondary") {
        bail!("the COLO secondary left COLO during the run: {mode}");
    }
    pair.check_alive()?;
    if pauses.is_empty() {
        bail!(
            "no COLO checkpoints in {window:.1} s (without {}, QEMU 7.2 under TCG deadlocks on its first checkpoints)",
            "qemu-scripts/colo-bql-shim.c"
        );
    }
    drop(p);
    drop(s);
    drop(pair);
    Ok(summarize(pauses, window, pages))
}

/// [`run_colo`], retried up to [`COLO_ATTEMPTS`] times.
fn run_colo_retried(
    o: &PauseOptions,
    ns: &str,
    work: &Path,
    mem: u32,
    dirty: u64,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<SideResult> {
    let mut failed = Vec::new();
    loop {
        check_interrupted()?;
        let dir = work.join(format!("colo-{mem}-{dirty}"));
        match run_colo(o, ns, &dir, mem, dirty, say) {
            Ok(mut r) => {
                r.failed_attempts = failed;
                return Ok(r);
            }
            Err(e) if failed.len() + 1 < COLO_ATTEMPTS && !INTERRUPTED.load(Ordering::SeqCst) => {
                let secondary = tail(&dir.join("secondary.log"), 3);
                let why = if secondary.trim().is_empty() {
                    format!("{e:#}")
                } else {
                    format!(
                        "{e:#}; secondary: {}",
                        secondary.trim().replace('\n', " / ")
                    )
                };
                say(&format!(
                    "  COLO attempt {} failed: {why}; retrying",
                    failed.len() + 1
                ));
                let _ = std::fs::rename(
                    &dir,
                    work.join(format!("colo-{mem}-{dirty}-failed{}", failed.len() + 1)),
                );
                failed.push(why);
            }
            Err(e) => {
                return Err(e.context(format!(
                    "after {} failed attempt(s): {}",
                    failed.len(),
                    failed.join(" | ")
                )))
            }
        }
    }
}

// ---------------------------------------------------------------- the run

/// Everything a run made, removed on every exit path: processes whose
/// command line names the work directory, then the namespace.
struct RunGuard {
    ns: String,
    work: PathBuf,
    keep: bool,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        crate::kill_processes_mentioning(&self.work.to_string_lossy());
        topology::delete_netns(&self.ns);
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

pub fn pause_vs_colo(o: &PauseOptions, mut say: impl FnMut(&str)) -> anyhow::Result<PauseReport> {
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
    if !o.colo_qemu.is_file() {
        bail!(
            "the COLO QEMU {} is missing: run qemu-scripts/colo-qemu.sh (QEMU 10.0's COLO is broken; it unpacks Debian's 7.2 privately)",
            o.colo_qemu.display()
        );
    }
    if let Some(shim) = &o.colo_shim {
        if !shim.is_file() {
            bail!(
                "the COLO shim {} is missing: run qemu-scripts/colo-qemu.sh (or pass --colo-shim none)",
                shim.display()
            );
        }
    }
    if o.seconds == 0 || o.memory_mib.is_empty() || o.dirty_mib_s.is_empty() {
        bail!("nothing to measure: give --seconds, --memory-mib and --dirty");
    }
    if !(10..=1000).contains(&o.epoch_ms) {
        bail!("--epoch-ms {} is outside 10..=1000", o.epoch_ms);
    }
    install_signal_handlers();
    let report_head = PauseReport {
        tandem_qemu: qemu_version(&o.qemu),
        colo_qemu: qemu_version(&o.colo_qemu),
        colo_shim: o.colo_shim.clone(),
        epoch_ms: o.epoch_ms,
        seconds: o.seconds,
        rows: Vec::new(),
    };
    let tag = format!("tcolo{}", std::process::id() % 100_000);
    let work = o.work_dir.join(&tag);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // On an error (an interrupt) everything goes; after a run with
    // failed cells, their logs stay.
    let mut guard = RunGuard {
        ns: tag.clone(),
        work: work.clone(),
        keep: false,
    };
    topology::ip(&["netns", "add", &tag]).context("creating the bench's network namespace")?;
    topology::in_ns(&tag, &["link", "set", "lo", "up"])?;

    let mut rng = Rng(o.seed);
    let mut report = report_head;
    for &mem in &o.memory_mib {
        for &dirty in &o.dirty_mib_s {
            check_interrupted()?;
            let colo_first = rng.below(2) == 1;
            say(&format!(
                "{mem} MiB guest, dirty {dirty} MiB/s: {} first",
                if colo_first { "COLO" } else { "tandem" }
            ));
            // A system that fails in one cell is reported there; the run
            // goes on (an interrupt still ends it).
            let cell = |colo: bool, say: &mut dyn FnMut(&str)| -> anyhow::Result<SideResult> {
                let mut say = |m: &str| say(m);
                let r = if colo {
                    run_colo_retried(o, &tag, &work, mem, dirty, &mut say)
                } else {
                    run_tandem(o, &tag, &work, mem, dirty, &mut say)
                };
                match r {
                    Ok(r) => Ok(r),
                    Err(e) => {
                        check_interrupted()?;
                        let name = if colo { "COLO" } else { "tandem" };
                        say(&format!("  {name} FAILED in this cell: {e:#}"));
                        Ok(SideResult {
                            error: Some(format!("{e:#}")),
                            ..SideResult::default()
                        })
                    }
                }
            };
            let (tandem, colo) = if colo_first {
                let c = cell(true, &mut say)?;
                (cell(false, &mut say)?, c)
            } else {
                let t = cell(false, &mut say)?;
                (t, cell(true, &mut say)?)
            };
            say(&format!(
                "  tandem p50 {:.1} ms p99 {:.1} ms {:.1}/s | COLO p50 {:.1} ms p99 {:.1} ms {:.1}/s",
                tandem.pause_p50_ms,
                tandem.pause_p99_ms,
                tandem.checkpoints_per_s,
                colo.pause_p50_ms,
                colo.pause_p99_ms,
                colo.checkpoints_per_s
            ));
            report.rows.push(PauseRow {
                memory_mib: mem,
                dirty_mib_s: dirty,
                first: if colo_first { "colo" } else { "tandem" }.to_string(),
                ratio_p50: tandem.pause_p50_ms / colo.pause_p50_ms,
                ratio_p99: tandem.pause_p99_ms / colo.pause_p99_ms,
                tandem,
                colo,
            });
        }
    }
    guard.keep = report.rows.iter().any(|r| {
        r.tandem.error.is_some() || r.colo.error.is_some() || !r.colo.failed_attempts.is_empty()
    });
    if guard.keep {
        say(&format!(
            "logs of the failed attempts kept in {}",
            work.display()
        ));
    }
    drop(guard);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(stop: bool, at: f64) -> PauseEvent {
        PauseEvent { stop, at }
    }

    #[test]
    fn pauses_pair_stop_with_the_next_resume_inside_the_window() {
        let events = [
            ev(true, 9.0),
            ev(false, 10.5), // starts before the window
            ev(true, 11.0),
            ev(false, 11.002),
            ev(false, 11.5), // RESUME without STOP
            ev(true, 12.0),
            ev(true, 12.1), // a second STOP restarts the pause
            ev(false, 12.104),
            ev(true, 19.9),
            ev(false, 20.5), // ends after the window
        ];
        let p = pauses_between(&events, 10.0, 20.0);
        assert_eq!(p.len(), 2);
        assert!((p[0] - 2.0).abs() < 1e-6);
        assert!((p[1] - 4.0).abs() < 1e-6);
    }

    #[test]
    fn log_tail_drops_colour_codes() {
        let p = std::env::temp_dir().join(format!("colobench-tail-{}", std::process::id()));
        std::fs::write(&p, "a\n\u{1b}[2mtime\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x\n").unwrap();
        assert_eq!(log_tail(&p, 1), "time  WARN x");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn dirty_rate_becomes_pages_per_epoch() {
        assert_eq!(pages_per_epoch(16, 50), 204);
        assert_eq!(pages_per_epoch(64, 50), 819);
        assert_eq!(pages_per_epoch(1, 10), 2);
        assert_eq!(pages_per_epoch(0, 50), 1);
        assert_eq!(pages_per_epoch(10_000, 1000), DIRTY_BUFFER_PAGES);
    }
}
