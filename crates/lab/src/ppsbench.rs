//! `tandem bench switch-pps`: the switch's own forwarding rate between two
//! VM ports, with DPDK's `testpmd` as a synthetic vhost-user frontend in
//! place of TCG guests.
//!
//! The switch runs in this process (a [`SwitchHost`] with two VM ports in
//! the `default` port group, as tandemd builds them for two NICs). Each
//! port's socket gets a `dpdk-testpmd` with a `net_virtio_user` device
//! (the port listens, so virtio-user is the client): one in `rxonly` on
//! port B, one in `txonly` on port A sending frames from A's MAC to B's.
//! The rate is what the switch delivered into B's RX ring, from the
//! switch's own port counters sampled once a second; the receiving
//! testpmd's total is printed beside it as a cross-check.
//!
//! Pinning (`--pin S,G`): every thread of this process — the switch's
//! port workers, shims and housekeeping, and the sampling main thread — is
//! bound to CPU S; both testpmd processes (all their threads) to CPU G.
//!
//! Nothing is installed here: `qemu-scripts/dpdk.sh up` installs Debian's
//! dpdk-testpmd if missing (idempotent) and reserves hugepages;
//! `dpdk.sh down` puts the hugepage count back, on every exit path.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::errno::Errno;
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::signal::{kill, signal, SigHandler, Signal};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::{sysconf, Pid, SysconfVar};
use serde::Serialize;
use tandem_switch::frame::Mac;
use tandem_switch::host::SwitchHost;
use tandem_switch::port::CounterSnapshot;

use crate::{stats_ms, tail};

const MAC_A: &str = "52:54:00:70:00:0a";
const MAC_B: &str = "52:54:00:70:00:0b";
/// 2 MiB hugepages reserved for the two testpmd processes.
const HUGEPAGES: u32 = 512;
/// MiB of hugepage memory per testpmd.
const TESTPMD_MEM_MIB: u32 = 256;
/// Ring size both virtio-user devices ask for (the port's maximum).
const RING: u32 = 1024;
const WARMUP: Duration = Duration::from_secs(1);
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct PpsOptions {
    /// Seconds measured per size (after a one-second warm-up), at most 10.
    pub seconds: u64,
    /// Ethernet frame sizes in bytes, FCS excluded (60..=1514).
    pub sizes: Vec<usize>,
    /// (CPU of this process and so the switch, CPU of testpmd).
    pub pin: Option<(usize, usize)>,
    pub generator: Generator,
    /// `qemu-scripts/dpdk.sh`.
    pub dpdk_script: PathBuf,
    pub work_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct PpsRow {
    pub frame_bytes: usize,
    pub generator: Generator,
    pub seconds: usize,
    /// Frames per second the switch delivered into port B's RX ring.
    pub mpps_median: f64,
    pub mpps_p99: f64,
    pub mpps_min: f64,
    /// The same, in Gbit/s of Ethernet frame bytes (no FCS, preamble or gap).
    pub gbit_s_median: f64,
    pub gbit_s_p99: f64,
    pub gbit_s_min: f64,
    /// Frames per second the switch took from port A's TX ring (median).
    pub offered_mpps_median: f64,
    /// Share of one CPU the switch's process used (median of the seconds).
    pub switch_cpu_share_median: f64,
    /// Delivered frames per CPU-second the switch used: the rate on a
    /// whole core of its own, whatever else ran on it.
    pub mpps_per_core_median: f64,
    pub mpps_per_core_p99: f64,
    pub gbit_s_per_core_median: f64,
    /// Share of the switch's CPU that other processes used over the window
    /// (`None` unpinned). Well above 0: the machine was not idle.
    pub others_on_switch_cpu: Option<f64>,
    /// Share of the switch's CPU the hypervisor ran something else on
    /// (steal time; `None` unpinned).
    pub steal_on_switch_cpu: Option<f64>,
    /// Every one-second sample of the delivered rate, in order.
    pub per_second_mpps: Vec<f64>,
    /// Frames the switch dropped (both ports, all reasons) in the window.
    pub dropped: u64,
    /// Frames the receiving testpmd counted over its whole run.
    pub testpmd_rx_total: Option<u64>,
    /// Frames testpmd could not put into a TX ring (it drops them).
    pub testpmd_tx_dropped: u64,
    /// Frames the switch delivered to port B over the same run.
    pub switch_tx_total: u64,
}

/// Set by SIGINT/SIGTERM while the bench runs: the sampling loop stops and
/// every guard below cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct SignalGuard {
    /// The dispositions `install` replaced.
    prev: Vec<(Signal, SigHandler)>,
}

impl SignalGuard {
    fn install() -> Self {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let prev = [Signal::SIGINT, Signal::SIGTERM]
            .into_iter()
            .filter_map(|sig| {
                // SAFETY: the handler only stores to an atomic.
                let old = unsafe { signal(sig, SigHandler::Handler(on_signal)) };
                old.ok().map(|old| (sig, old))
            })
            .collect();
        Self { prev }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for &(sig, h) in &self.prev {
            // SAFETY: puts back the disposition `install` replaced.
            let _ = unsafe { signal(sig, h) };
        }
    }
}

/// Hugepages (and testpmd itself) for the duration of the bench.
struct DpdkEnv {
    script: PathBuf,
    state: PathBuf,
}

impl DpdkEnv {
    fn up(script: &Path, work: &Path) -> anyhow::Result<Self> {
        let state = work.join("dpdk.state");
        let env = Self {
            script: script.to_path_buf(),
            state,
        };
        let st = Command::new("bash")
            .arg(&env.script)
            .arg("up")
            .arg(&env.state)
            .arg(HUGEPAGES.to_string())
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("running {}", env.script.display()))?;
        if !st.success() {
            bail!("{} up failed ({st})", env.script.display());
        }
        Ok(env)
    }
}

impl Drop for DpdkEnv {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("down")
            .arg(&self.state)
            .stdin(Stdio::null())
            .status();
    }
}

/// A testpmd this bench started: interrupted (it prints its totals), then
/// killed if it does not exit in time; always reaped.
struct Testpmd {
    child: Option<Child>,
    /// Interactive mode's command line.
    stdin: Option<std::process::ChildStdin>,
    log: PathBuf,
    name: &'static str,
}

impl Testpmd {
    /// `ports`: (socket, MAC) of each virtio-user device, in port order.
    /// `interactive`: `-i` with commands on a pipe, else `--stats-period`.
    fn spawn(
        name: &'static str,
        ports: &[(&Path, &str)],
        prefix: &str,
        cpu: Option<usize>,
        interactive: bool,
        extra: &[String],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new("dpdk-testpmd");
        // Two lcores (main + one forwarding core) both on the generator's
        // CPU: testpmd needs a forwarding lcore apart from its main one.
        let lcores = match cpu {
            Some(c) => format!("0@{c},1@{c}"),
            None => "0,1".into(),
        };
        cmd.args([
            "--lcores",
            &lcores,
            "--no-pci",
            "--in-memory",
            // One memory region per process: vhost-user allows 8.
            "--single-file-segments",
        ])
        .arg(format!("--file-prefix={prefix}"))
        .args(["-m", &TESTPMD_MEM_MIB.to_string(), "--iova-mode=va"]);
        for (i, (socket, mac)) in ports.iter().enumerate() {
            cmd.arg(format!(
                "--vdev=net_virtio_user{i},path={},queues=1,queue_size={RING},mac={mac}",
                socket.display()
            ));
        }
        cmd.arg("--")
            .args([
                "--nb-cores=1",
                "--rxq=1",
                "--txq=1",
                &format!("--rxd={RING}"),
                &format!("--txd={RING}"),
                "--burst=32",
                "--total-num-mbufs=32768",
            ])
            .arg(if interactive {
                "-i"
            } else {
                "--stats-period=1"
            })
            .args(extra)
            .stdin(if interactive {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if let Some(c) = cpu {
            let set = one_cpu(c)?;
            // SAFETY: between fork and exec only sched_setaffinity(2), which
            // is async-signal-safe, on a set made before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    sched_setaffinity(Pid::from_raw(0), &set).map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd.spawn().context("starting dpdk-testpmd")?;
        Ok(Self {
            stdin: child.stdin.take(),
            child: Some(child),
            log,
            name,
        })
    }

    /// A command on testpmd's interactive command line.
    fn command(&mut self, line: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("testpmd ({}) is not interactive", self.name))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("testpmd ({}): `{line}`", self.name))
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                bail!(
                    "testpmd ({}) exited ({st}):\n{}",
                    self.name,
                    tail(&self.log, 15)
                );
            }
        }
        Ok(())
    }

    /// Stops it and returns its log.
    fn stop(&mut self) -> String {
        if self.child.is_some() && self.stdin.is_some() {
            // Interactive: `stop` prints the forwarding totals.
            let _ = self.command("stop");
            std::thread::sleep(Duration::from_millis(300));
        }
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            // The child this bench started; already gone is fine.
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The switch in this process; its ports and threads stop on drop.
struct SwitchGuard(Arc<SwitchHost>);

impl Drop for SwitchGuard {
    fn drop(&mut self) {
        self.0.detach_vm("pps-a");
        self.0.detach_vm("pps-b");
        self.0.shutdown();
    }
}

/// Restores every thread's CPU affinity on drop.
struct Affinity(Option<CpuSet>);

/// The set of CPU `cpu` alone.
fn one_cpu(cpu: usize) -> anyhow::Result<CpuSet> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .map_err(|e| anyhow!("CPU {cpu}: {}", std::io::Error::from(e)))?;
    Ok(set)
}

impl Affinity {
    fn pin_process(cpu: Option<usize>) -> anyhow::Result<Self> {
        let Some(cpu) = cpu else {
            return Ok(Self(None));
        };
        let prev = sched_getaffinity(Pid::from_raw(0))
            .map_err(|e| anyhow!("sched_getaffinity: {}", std::io::Error::from(e)))?;
        set_all_threads(&one_cpu(cpu)?)?;
        Ok(Self(Some(prev)))
    }

    /// Pins threads started since (they inherit from the thread that made
    /// them, but not all are made by this one).
    fn reapply(&self, cpu: Option<usize>) -> anyhow::Result<()> {
        if let (Some(_), Some(cpu)) = (self.0, cpu) {
            set_all_threads(&one_cpu(cpu)?)?;
        }
        Ok(())
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            let _ = set_all_threads(&prev);
        }
    }
}

fn set_all_threads(set: &CpuSet) -> anyhow::Result<()> {
    for e in std::fs::read_dir("/proc/self/task")?.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // A thread of this process; one that has just exited fails
        // harmlessly.
        match sched_setaffinity(Pid::from_raw(tid), set) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => bail!("sched_setaffinity({tid}): {}", std::io::Error::from(e)),
        }
    }
    Ok(())
}

fn counters(host: &SwitchHost, name: &str) -> Option<(bool, CounterSnapshot)> {
    host.stats()
        .ports
        .into_iter()
        .find(|p| p.name == name)
        .map(|p| (p.up, p.counters))
}

#[derive(Clone)]
struct Sample {
    at: Instant,
    a: CounterSnapshot,
    b: CounterSnapshot,
    /// CPU time of this whole process (all its threads).
    cpu_s: f64,
    /// Busy and stolen time of the switch's CPU, from /proc/stat.
    ticks: Option<(u64, u64)>,
}

fn process_cpu_seconds() -> f64 {
    match clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID) {
        Ok(ts) => ts.tv_sec() as f64 + ts.tv_nsec() as f64 / 1e9,
        Err(_) => 0.0,
    }
}

fn user_hz() -> f64 {
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    }
}

/// Ticks CPU `cpu` spent running anything (not idle, I/O wait or
/// stolen), and ticks stolen from it by the hypervisor.
fn cpu_ticks(cpu: usize) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    Some((busy, *v.get(7)?))
}

fn drops(c: &CounterSnapshot) -> u64 {
    c.drops.total()
}

/// A total from the statistics testpmd prints when it stops: the number
/// after the last `key` (e.g. `RX-packets:`) in its log.
fn testpmd_total(log: &str, key: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        let rest = l.split(key).nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn wait_up(host: &SwitchHost, port: &str, pmd: &mut Testpmd) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        pmd.check_alive()?;
        if counters(host, port).is_some_and(|(up, _)| up) {
            return Ok(());
        }
        let log = std::fs::read_to_string(&pmd.log).unwrap_or_default();
        if log.contains("Failed to start device") {
            bail!(
                "testpmd's virtio-user could not start on port {port}:\n{}",
                log.lines()
                    .filter(|l| !l.trim().is_empty())
                    .take(12)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if Instant::now() >= deadline {
            bail!(
                "testpmd did not attach to port {port} within {START_TIMEOUT:?}:\n{}",
                tail(&pmd.log, 15)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn switch_pps(opts: &PpsOptions, mut say: impl FnMut(&str)) -> anyhow::Result<Vec<PpsRow>> {
    if opts.seconds == 0 || opts.seconds > 10 {
        bail!("--seconds must be 1..=10 (2 cores: keep runs short)");
    }
    if let Some(s) = opts.sizes.iter().find(|s| !(60..=1514).contains(*s)) {
        bail!("frame size {s}: sizes are Ethernet frames without FCS, 60..=1514 bytes");
    }
    if let Some((s, g)) = opts.pin {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if s == g || s >= n || g >= n || s >= CpuSet::count() {
            bail!("--pin {s},{g}: two different CPUs below {n} are needed");
        }
    }
    if !opts.dpdk_script.is_file() {
        bail!(
            "{} not found (run from the repository or pass --dpdk-script)",
            opts.dpdk_script.display()
        );
    }
    let tag = std::process::id();
    let work = opts.work_dir.join(format!("tpps-{tag}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let _signals = SignalGuard::install();
    let result = (|| {
        let _dpdk = DpdkEnv::up(&opts.dpdk_script, &work)?;
        run_sizes(opts, &work, tag, &mut say)
    })();
    match &result {
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&work);
        }
        Err(_) => say(&format!("testpmd logs kept in {}", work.display())),
    }
    result
}

/// How the frames are made and taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Generator {
    /// One testpmd with both ports in `io` forwarding: `start tx_first`
    /// puts [`LOOP_BURSTS`] bursts of frames from A to B in flight, and
    /// every frame arriving on B is sent again on A (unchanged: source A,
    /// destination B). A closed loop on one polling thread: the rate is
    /// the switch's, as long as the switch is slower than testpmd. Port
    /// B's own first burst goes to an address nobody owns and is dropped
    /// by the switch, so traffic runs one way only.
    Loop,
    /// Two testpmd processes, `txonly` on A and `rxonly` on B. On a
    /// two-core machine both poll on the one generator CPU and take turns
    /// in scheduler slices; while the sender runs, the receiver does not
    /// drain B's ring, so this mostly measures that time-sharing.
    Split,
}

impl Generator {
    pub fn name(self) -> &'static str {
        match self {
            Generator::Loop => "loop",
            Generator::Split => "split",
        }
    }
}

impl std::str::FromStr for Generator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "loop" => Ok(Generator::Loop),
            "split" => Ok(Generator::Split),
            _ => Err(format!("`{s}`: the generators are loop and split")),
        }
    }
}

/// Bursts of 32 frames `start tx_first` sends per port in loop mode: 1024
/// frames in flight, one ring's worth (here, fewer than 16 bursts left the
/// switch idle part of the time; more did not raise the rate).
const LOOP_BURSTS: u32 = 32;
/// Destination of port B's first burst in loop mode: owned by no port.
const NOBODY: &str = "02:00:00:00:00:01";

/// Starts the frontends on both ports and the traffic; returns them
/// sender first.
#[allow(clippy::too_many_arguments)]
fn start_generator(
    generator: Generator,
    host: &SwitchHost,
    (sock_a, port_a): (&Path, &str),
    (sock_b, port_b): (&Path, &str),
    size: usize,
    cpu: Option<usize>,
    prefix: &str,
    work: &Path,
) -> anyhow::Result<Vec<Testpmd>> {
    match generator {
        Generator::Loop => {
            let mut pmd = Testpmd::spawn(
                "io loop",
                &[(sock_a, MAC_A), (sock_b, MAC_B)],
                prefix,
                cpu,
                true,
                &[
                    "--forward-mode=io".into(),
                    format!("--txpkts={size}"),
                    format!("--eth-peer=0,{MAC_B}"),
                    format!("--eth-peer=1,{NOBODY}"),
                ],
                work.join(format!("testpmd-loop-{size}.log")),
            )?;
            wait_up(host, port_a, &mut pmd)?;
            wait_up(host, port_b, &mut pmd)?;
            pmd.command(&format!("start tx_first {LOOP_BURSTS}"))?;
            Ok(vec![pmd])
        }
        Generator::Split => {
            let mut rx = Testpmd::spawn(
                "rxonly",
                &[(sock_b, MAC_B)],
                &format!("{prefix}rx"),
                cpu,
                false,
                &["--forward-mode=rxonly".into()],
                work.join(format!("testpmd-rx-{size}.log")),
            )?;
            wait_up(host, port_b, &mut rx)?;
            let mut tx = Testpmd::spawn(
                "txonly",
                &[(sock_a, MAC_A)],
                &format!("{prefix}tx"),
                cpu,
                false,
                &[
                    "--forward-mode=txonly".into(),
                    format!("--txpkts={size}"),
                    format!("--eth-peer=0,{MAC_B}"),
                ],
                work.join(format!("testpmd-tx-{size}.log")),
            )?;
            wait_up(host, port_a, &mut tx)?;
            Ok(vec![tx, rx])
        }
    }
}

fn run_sizes(
    opts: &PpsOptions,
    work: &Path,
    tag: u32,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<Vec<PpsRow>> {
    let sw_cpu = opts.pin.map(|(s, _)| s);
    // Pin before the switch starts, so every thread it makes inherits.
    let affinity = Affinity::pin_process(sw_cpu)?;
    let host = SwitchGuard(
        SwitchHost::start(&work.join("switch.toml")).map_err(|e| anyhow!("switch: {e}"))?,
    );
    let sock_a = work.join("a.sock");
    let sock_b = work.join("b.sock");
    let mac = |m: &str| m.parse::<Mac>().map_err(|e| anyhow!("{e}"));
    host.0
        .attach_vm("pps-a", "eth0", mac(MAC_A)?, "default", &sock_a)
        .map_err(|e| anyhow!("port A: {e}"))?;
    host.0
        .attach_vm("pps-b", "eth0", mac(MAC_B)?, "default", &sock_b)
        .map_err(|e| anyhow!("port B: {e}"))?;
    let run = SizeRun {
        opts,
        host: &host.0,
        affinity: &affinity,
        a: (&sock_a, "pps-a.eth0"),
        b: (&sock_b, "pps-b.eth0"),
        prefix: format!("tpps{tag}"),
        work,
    };
    let mut rows = Vec::new();
    for &size in &opts.sizes {
        rows.push(run.measure(size, say)?);
    }
    drop(host);
    drop(affinity);
    Ok(rows)
}

/// What every frame size is measured with: the switch and its two ports
/// (socket, port name).
struct SizeRun<'a> {
    opts: &'a PpsOptions,
    host: &'a SwitchHost,
    affinity: &'a Affinity,
    a: (&'a Path, &'a str),
    b: (&'a Path, &'a str),
    /// testpmd's file prefix.
    prefix: String,
    work: &'a Path,
}

/// The one-second rates of a window, one entry per second.
#[derive(Default)]
struct Series {
    /// Mpps and Gbit/s delivered into B.
    pps: Vec<f64>,
    gbit: Vec<f64>,
    /// Mpps taken from A.
    offered: Vec<f64>,
    /// Share of one CPU this process used.
    share: Vec<f64>,
    /// Delivered per CPU-second used.
    pps_core: Vec<f64>,
    gbit_core: Vec<f64>,
}

impl Series {
    fn push(&mut self, prev: &Sample, cur: &Sample) {
        let dt = cur.at.duration_since(prev.at).as_secs_f64();
        let cpu = (cur.cpu_s - prev.cpu_s).max(1e-6);
        let frames = (cur.b.tx_frames - prev.b.tx_frames) as f64;
        let bytes = (cur.b.tx_bytes - prev.b.tx_bytes) as f64;
        self.pps.push(frames / dt / 1e6);
        self.gbit.push(bytes * 8.0 / dt / 1e9);
        self.offered
            .push((cur.a.rx_frames - prev.a.rx_frames) as f64 / dt / 1e6);
        self.share.push(cpu / dt);
        self.pps_core.push(frames / cpu / 1e6);
        self.gbit_core.push(bytes * 8.0 / cpu / 1e9);
    }
}

impl SizeRun<'_> {
    fn snap(&self) -> anyhow::Result<Sample> {
        let a = counters(self.host, self.a.1).ok_or_else(|| anyhow!("port A is gone"))?;
        let b = counters(self.host, self.b.1).ok_or_else(|| anyhow!("port B is gone"))?;
        Ok(Sample {
            at: Instant::now(),
            a: a.1,
            b: b.1,
            cpu_s: process_cpu_seconds(),
            ticks: self.sw_cpu().and_then(cpu_ticks),
        })
    }

    fn sw_cpu(&self) -> Option<usize> {
        self.opts.pin.map(|(s, _)| s)
    }

    /// One sample per second for `seconds`, while the generator runs:
    /// the first and last samples, and the rates in between.
    fn sample_window(&self, pmds: &mut [Testpmd]) -> anyhow::Result<(Sample, Sample, Series)> {
        let first = self.snap()?;
        let mut prev = first.clone();
        let mut series = Series::default();
        for i in 1..=self.opts.seconds {
            let due = first.at + Duration::from_secs(i);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            for p in pmds.iter_mut() {
                p.check_alive()?;
            }
            let cur = self.snap()?;
            series.push(&prev, &cur);
            prev = cur;
        }
        Ok((first, prev, series))
    }

    fn measure(&self, size: usize, say: &mut impl FnMut(&str)) -> anyhow::Result<PpsRow> {
        let opts = self.opts;
        say(&format!(
            "{size} B frames, port A -> port B, {} generator, {} s",
            opts.generator.name(),
            opts.seconds
        ));
        // Stopped in this order when dropped: the sender first.
        let mut pmds = start_generator(
            opts.generator,
            self.host,
            self.a,
            self.b,
            size,
            opts.pin.map(|(_, g)| g),
            &self.prefix,
            self.work,
        )?;
        // New threads (the ports' connection workers) appeared meanwhile.
        self.affinity.reapply(self.sw_cpu())?;
        let b_start = counters(self.host, self.b.1)
            .map(|c| c.1)
            .unwrap_or_default();

        std::thread::sleep(WARMUP);
        let (first, last, mut series) = self.sample_window(&mut pmds)?;
        let wall = last.at.duration_since(first.at).as_secs_f64();
        // What else ran on the switch's CPU (its busy time less this
        // process's CPU time), and what the hypervisor took from it.
        let (others, steal) = match (first.ticks, last.ticks) {
            (Some((b0, s0)), Some((b1, s1))) => (
                Some((((b1 - b0) as f64 / user_hz() - (last.cpu_s - first.cpu_s)) / wall).max(0.0)),
                Some((s1 - s0) as f64 / user_hz() / wall),
            ),
            _ => (None, None),
        };
        let dropped = drops(&last.a) + drops(&last.b) - drops(&first.a) - drops(&first.b);
        // The sender first, so the receiver's total is final.
        let mut pmd_logs = Vec::new();
        for (i, p) in pmds.iter_mut().enumerate() {
            pmd_logs.push(p.stop());
            if i == 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let b_end = counters(self.host, self.b.1)
            .map(|c| c.1)
            .unwrap_or_default();
        let rx_log = pmd_logs.last().cloned().unwrap_or_default();
        let per_second_mpps = series.pps.clone();
        let per_second_cpu = series.share.clone();
        let Series {
            pps,
            gbit,
            offered,
            share,
            pps_core,
            gbit_core,
        } = &mut series;
        let row = PpsRow {
            frame_bytes: size,
            generator: opts.generator,
            seconds: pps.len(),
            mpps_median: stats_ms(pps, 50.0),
            mpps_p99: stats_ms(pps, 99.0),
            mpps_min: stats_ms(pps, 0.0),
            gbit_s_median: stats_ms(gbit, 50.0),
            gbit_s_p99: stats_ms(gbit, 99.0),
            gbit_s_min: stats_ms(gbit, 0.0),
            offered_mpps_median: stats_ms(offered, 50.0),
            switch_cpu_share_median: stats_ms(share, 50.0),
            mpps_per_core_median: stats_ms(pps_core, 50.0),
            mpps_per_core_p99: stats_ms(pps_core, 99.0),
            gbit_s_per_core_median: stats_ms(gbit_core, 50.0),
            others_on_switch_cpu: others,
            steal_on_switch_cpu: steal,
            per_second_mpps,
            dropped,
            testpmd_rx_total: testpmd_total(&rx_log, "RX-packets:"),
            testpmd_tx_dropped: pmd_logs
                .iter()
                .filter_map(|l| testpmd_total(l, "TX-dropped:"))
                .sum(),
            switch_tx_total: b_end.tx_frames - b_start.tx_frames,
        };
        let series: Vec<String> = row
            .per_second_mpps
            .iter()
            .zip(&per_second_cpu)
            .map(|(r, c)| format!("{r:.3}@{:.0}%", c * 100.0))
            .collect();
        say(&format!(
            "{size} B: {:.3} Mpps median, {:.2} Gbit/s median; per second (Mpps@switch CPU): {}",
            row.mpps_median,
            row.gbit_s_median,
            series.join(" ")
        ));
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_total_is_the_last_count() {
        let log = "  RX-packets: 12  RX-missed: 0\n...\n  RX-packets: 345      RX-dropped: 0 \n";
        assert_eq!(testpmd_total(log, "RX-packets:"), Some(345));
        assert_eq!(testpmd_total(log, "RX-dropped:"), Some(0));
        assert_eq!(testpmd_total("nothing", "RX-packets:"), None);
    }
}
