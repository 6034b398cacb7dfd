//! tandem's lab: everything that exercises tandem from the outside on one
//! machine, apart from the test suite. It owns
//!
//! - the failover drill ([`run`]): a two-host [`topology`] in network
//!   namespaces, a tandemd per host, a durable client workload, a kill,
//!   and the invariants ([`checker`]) checked against the resumed guest;
//! - the benchmarks: output commit and guest throughput ([`bench`]), the
//!   switch against a Linux bridge ([`switchbench`]), the switch's packet
//!   rate under DPDK testpmd ([`ppsbench`]), and the epoch pause against
//!   QEMU's COLO ([`colobench`]);
//! - the `tandem-lab` binary (`src/bin/tandem-lab`), their command line.
//!   The operator CLI runs it for `tandem drill` and `tandem bench`, so
//!   neither `tandem` nor `tandemd` links any of this.
//!
//! # The drill
//!
//! Each round builds a two-host topology in network namespaces
//! ([`topology`]), starts a tandemd per host, boots the guest service on
//! host A, protects it to host B, and drives a client workload from a third
//! namespace: every `PUT` is fsync'd by the guest before its numbered reply.
//! Replies are held until the epoch that produced them is committed (the
//! all-hold gate: output commit for the whole guest). Then host A is killed
//! at a random moment — its QEMU, its network, or its tandemd — and the
//! drill checks ([`checker`]) that B took over, that every reply the client
//! received is known to the resumed VM, that every acknowledged record is on
//! the replica disk, and that the client continues.
//!
//! Before the rounds, [`cluster`] drills the cluster on the same kind of
//! topology: a `tandem-manager` that reaches each host only through the
//! host's switch, the hosts joined, a distributed switch change that
//! commits, and a bad one that the canary host rolls back by itself while
//! the guest serves.

pub mod bench;
pub mod bounded;
pub mod checker;
pub mod cluster;
pub mod colobench;
pub mod deploybench;
pub mod migbench;
pub mod ppsbench;
pub mod switchbench;
pub mod topology;

mod round;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tandem_api::{FtRole, FtStatus, VmInfo};

use topology::{Topology, GUEST_IP, REPL_B, UPLINK_A, UPLINK_B};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KillMode {
    Qemu,
    Network,
    Tandemd,
}

impl std::str::FromStr for KillMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qemu" => Ok(KillMode::Qemu),
            "network" => Ok(KillMode::Network),
            "tandemd" => Ok(KillMode::Tandemd),
            _ => Err(format!("`{s}`: the kill modes are qemu, network, tandemd")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub rounds: u32,
    /// `None`: cycle qemu, network, tandemd.
    pub kill: Option<KillMode>,
    pub seed: u64,
    pub epoch_ms: u64,
    pub memory_mib: u32,
    /// Output commit in host A's switch: `classified`, `all-hold`, or
    /// `off` (nothing held: the drill must then fail — that is how the
    /// checker is proven able to fail).
    pub output: String,
    /// The rule profile in `classified` mode. The drill always puts the
    /// request/reply service (TCP 7070, state-changing) first as `hold`.
    pub profile: String,
    /// Test-only: pass TCP segments keep their real acknowledgements. The
    /// upload check must then fail.
    pub unsafe_no_clamp: bool,
    pub tandemd: PathBuf,
    pub image_dir: PathBuf,
    pub work_dir: PathBuf,
    /// Failure detection and fencing settings given to both tandemds.
    pub timeouts: FtTimeouts,
}

/// tandemd's `--ft-heartbeat-ms`, `--ft-fence-timeout-ms` and
/// `--ft-takeover-timeout-ms`, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FtTimeouts {
    pub heartbeat_ms: u64,
    pub fence_timeout_ms: u64,
    pub takeover_timeout_ms: u64,
}

impl FtTimeouts {
    /// The flags that give a tandemd these settings.
    pub fn tandemd_args(&self) -> Vec<String> {
        [
            ("--ft-heartbeat-ms", self.heartbeat_ms),
            ("--ft-fence-timeout-ms", self.fence_timeout_ms),
            ("--ft-takeover-timeout-ms", self.takeover_timeout_ms),
        ]
        .into_iter()
        .flat_map(|(flag, ms)| [flag.to_string(), ms.to_string()])
        .collect()
    }
}

impl Default for FtTimeouts {
    /// tandemd's own defaults.
    fn default() -> Self {
        FtTimeouts {
            heartbeat_ms: 100,
            fence_timeout_ms: 1500,
            takeover_timeout_ms: 2500,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub kill: Option<KillMode>,
    pub kill_after_replies: usize,
    pub replies_delivered: usize,
    pub replies_discarded: usize,
    pub epochs_committed: u64,
    pub pause_p50_ms: f64,
    pub pause_p99_ms: f64,
    pub detection_ms: f64,
    /// Detected → takeover decision (the wait for the primary's fence).
    pub fence_wait_ms: f64,
    pub restore_ms: f64,
    pub client_served_ms: f64,
    pub continued_records: usize,
    /// Upload bytes the client had seen acknowledged at the check, and the
    /// bytes the resumed guest had received intact.
    pub upload_acked: u64,
    pub upload_received: u64,
    /// The guest's own check of its churned memory after failover.
    pub memory_check: String,
    pub violations: Vec<String>,
    pub passed: bool,
}

/// A small deterministic generator, so `--seed` replays a drill.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub fn run(opts: &DrillOptions, mut say: impl FnMut(&str)) -> anyhow::Result<Vec<RoundReport>> {
    for f in ["vmlinux", "initrd.img", "data.qcow2"] {
        if !opts.image_dir.join(f).is_file() {
            bail!(
                "guest image {} missing: run images/build.sh",
                opts.image_dir.join(f).display()
            );
        }
    }
    if !opts.tandemd.is_file() {
        bail!("tandemd not found at {}", opts.tandemd.display());
    }
    let mut rng = Rng(opts.seed);
    let mut reports = Vec::new();
    for round in 1..=opts.rounds {
        let kill = opts.kill.unwrap_or(match (round - 1) % 3 {
            0 => KillMode::Qemu,
            1 => KillMode::Network,
            _ => KillMode::Tandemd,
        });
        say(&format!("round {round}/{}: kill {kill:?}", opts.rounds));
        let r = round::run_round(opts, round, kill, &mut rng, &mut say)
            .with_context(|| format!("round {round}"))?;
        say(&format!(
            "round {round}: {} — {} replies, failover detection {:.0} ms + fence wait {:.0} ms + restore {:.0} ms, client served {:.0} ms after the kill",
            if r.passed { "PASS" } else { "FAIL" },
            r.replies_delivered,
            r.detection_ms,
            r.fence_wait_ms,
            r.restore_ms,
            r.client_served_ms
        ));
        for v in &r.violations {
            say(&format!("  violation: {v}"));
        }
        reports.push(r);
    }
    Ok(reports)
}

pub(crate) struct Host {
    socket: PathBuf,
    state: PathBuf,
    ram_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Host {
    fn start(
        name: &'static str,
        ns: &str,
        uplink: &str,
        opts: &DrillOptions,
        work: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Host> {
        // The host's switch: the guest's port group, with the fabric uplink.
        let doc = format!(
            "[[port_group]]\nname = \"vms\"\nvlan = 10\n\n[[uplink]]\nname = \"fabric\"\ninterfaces = [\"{uplink}\"]\nport_group = \"vms\"\n"
        );
        Self::start_with_switch(name, ns, &doc, opts, work, extra)
    }

    fn start_with_switch(
        name: &'static str,
        ns: &str,
        switch_doc: &str,
        opts: &DrillOptions,
        work: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Host> {
        let socket = work.join(format!("{name}.sock"));
        let state = work.join(name);
        let ram_dir = PathBuf::from(format!(
            "/dev/shm/{}-{name}",
            work.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("tdrill")
        ));
        let log = work.join(format!("tandemd-{name}.log"));
        let logf = std::fs::File::create(&log)?;
        let switch_config = work.join(format!("switch-{name}.toml"));
        std::fs::write(&switch_config, switch_doc)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&opts.tandemd)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .arg("--ram-dir")
            .arg(&ram_dir)
            .arg("--image-dir")
            .arg(&opts.image_dir)
            .arg("--switch-config")
            .arg(&switch_config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(logf))
            .spawn()
            .context("starting tandemd")?;
        let mut h = Host {
            socket,
            state,
            ram_dir,
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&h.socket).is_err() {
            if let Some(Ok(Some(st))) = h.child.as_mut().map(|c| c.try_wait()) {
                bail!("tandemd {name} exited ({st}): {}", tail(&h.log, 10));
            }
            if Instant::now() > deadline {
                bail!("tandemd {name} did not start: {}", tail(&h.log, 10));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(h)
    }

    fn api(&self) -> tandem_api::Client {
        tandem_api::Client::new(&self.socket)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if self.child.is_some() {
            let api = self.api();
            let _ = block_on(api.delete::<serde_json::Value>("/v1/vms/drill"));
            if let Some(c) = &self.child {
                // The tandemd this drill started; already gone is fine.
                let _ = signal::kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            }
            if let Some(mut c) = self.child.take() {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Whatever QEMU this host ran must not outlive the drill.
        kill_processes_mentioning(&self.state.to_string_lossy());
        let _ = std::fs::remove_dir_all(&self.ram_dir);
    }
}

/// Nearest-rank percentile of `v` (sorted in place), in the unit of `v`.
pub fn stats_ms(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(f)
}

fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kill_processes_mentioning(needle: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains(needle) && pid != std::process::id() as i32 {
            // The process runs on this drill's state.
            let pid = Pid::from_raw(pid);
            let _ = signal::kill(pid, Signal::SIGCONT);
            let _ = signal::kill(pid, Signal::SIGKILL);
        }
    }
}

fn ft_primary(h: &Host) -> anyhow::Result<FtStatus> {
    let v: Vec<FtStatus> = block_on(h.api().get("/v1/ft/drill"))?;
    v.into_iter()
        .find(|s| s.role == Some(FtRole::Primary))
        .ok_or_else(|| anyhow!("no primary status"))
}

fn ft_backup(h: &Host) -> anyhow::Result<FtStatus> {
    let v: Vec<FtStatus> = block_on(h.api().get("/v1/ft/drill"))?;
    v.into_iter()
        .find(|s| s.role == Some(FtRole::Backup))
        .ok_or_else(|| anyhow!("no backup status"))
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two hosts and a client in namespaces, a tandemd per host, and the guest
/// service booted (not yet protected) on host A.
struct Site {
    // Field order is drop order: daemons (and their QEMUs) go before the
    // namespaces they live in.
    a: Host,
    b: Host,
    topo: Topology,
    work: PathBuf,
    repl: String,
}

fn bring_up(opts: &DrillOptions, tag: &str) -> anyhow::Result<Site> {
    let work = opts.work_dir.join(format!("tdrill-{tag}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let topo = Topology::create(tag).context("building the namespaces")?;
    let owned = opts.timeouts.tandemd_args();
    let timeouts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let repl = format!("{REPL_B}:7400");
    let mut b_args = timeouts.to_vec();
    // The failover rounds' hosts have no cluster identity (the cluster
    // steps use their own): an explicit opt-in to plain TCP.
    b_args.extend(["--repl-listen", repl.as_str(), "--repl-unauthenticated"]);
    let b = Host::start("b", &topo.b, UPLINK_B, opts, &work, &b_args)?;
    let a = Host::start("a", &topo.a, UPLINK_A, opts, &work, &timeouts)?;
    boot_guest(&a, opts, &work)?;
    Ok(Site {
        work,
        topo,
        a,
        b,
        repl,
    })
}

/// Creates the drill's guest on `host` (its data disk a fresh copy in
/// `work`, its NIC in port group `vms`) and waits until its service is up.
fn boot_guest(host: &Host, opts: &DrillOptions, work: &Path) -> anyhow::Result<()> {
    let disk = work.join("drill-data.qcow2");
    std::fs::copy(opts.image_dir.join("data.qcow2"), &disk)?;
    let spec = format!(
        r#"name = "drill"
memory_mib = {mem}
accelerator = "tcg"
shutdown_timeout_s = 20
[boot]
kernel = "{k}"
initrd = "{i}"
cmdline = "console=ttyS0 loglevel=4 tandem.ip={GUEST_IP}/24"
[[disks]]
name = "data"
path = "{d}"
[[nics]]
name = "eth0"
mac = "52:54:00:77:00:10"
backend = "switch"
port_group = "vms"
"#,
        mem = opts.memory_mib,
        k = opts.image_dir.join("vmlinux").display(),
        i = opts.image_dir.join("initrd.img").display(),
        d = disk.display(),
    );
    let api_a = host.api();
    let _: VmInfo = block_on(api_a.post(
        "/v1/vms",
        &tandem_api::CreateVmRequest {
            spec_toml: spec,
            uuid: None,
        },
    ))?;
    let _: VmInfo = block_on(api_a.post("/v1/vms/drill/start", &()))?;
    wait_for("guest ready on A", Duration::from_secs(120), || {
        let c: tandem_api::ConsoleChunk =
            block_on(api_a.get("/v1/vms/drill/console?offset=0")).ok()?;
        c.data.contains("TANDEM-GUEST-READY").then_some(())
    })?;
    Ok(())
}

/// Protects the guest on A to B and waits until B holds a resumable replica.
fn protect(
    a: &Host,
    b: &Host,
    repl: &str,
    opts: &DrillOptions,
    epoch_ms: u64,
) -> anyhow::Result<()> {
    // The record service's replies report durable writes: state.
    protect_with(
        a,
        b,
        repl,
        opts,
        epoch_ms,
        vec!["hold tcp sport 7070".to_string()],
    )
}

fn protect_with(
    a: &Host,
    b: &Host,
    repl: &str,
    opts: &DrillOptions,
    epoch_ms: u64,
    rules: Vec<String>,
) -> anyhow::Result<()> {
    protect_with_tracker(a, b, repl, opts, epoch_ms, rules, None)
}

/// [`protect_with`] naming the dirty-page tracker (`None`: tandemd's
/// default).
fn protect_with_tracker(
    a: &Host,
    b: &Host,
    repl: &str,
    opts: &DrillOptions,
    epoch_ms: u64,
    rules: Vec<String>,
    tracker: Option<&str>,
) -> anyhow::Result<()> {
    let _: FtStatus = block_on(a.api().post(
        "/v1/vms/drill/protect",
        &tandem_api::ProtectRequest {
            backup: repl.to_string(),
            epoch_ms: Some(epoch_ms),
            output_mode: Some(opts.output.clone()),
            profile: Some(opts.profile.clone()),
            rules: Some(rules),
            hold_max_frames: None,
            hold_max_bytes: None,
            tracker: tracker.map(str::to_string),
            unsafe_no_clamp: opts.unsafe_no_clamp,
            generation: None,
        },
    ))?;
    wait_for("protection", Duration::from_secs(120), || {
        let s = ft_primary(a).ok()?;
        (s.state.as_str() == "protected").then_some(())
    })?;
    wait_for("backup standby", Duration::from_secs(30), || {
        (ft_backup(b).ok()?.state.as_str() == "standby").then_some(())
    })?;
    Ok(())
}

/// A host's switch counters, protection status (with the output gate) and
/// VM record, for a failed round's report.
fn host_state(api: &tandem_api::Client) -> String {
    ["/v1/switch/stats", "/v1/ft/drill", "/v1/vms/drill"]
        .iter()
        .map(|path| {
            let v = block_on(api.get::<serde_json::Value>(path))
                .map(|v| v.to_string())
                .unwrap_or_else(|e| format!("unavailable: {e}"));
            format!("{path}: {v}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One request/reply with the guest service, on a fresh connection.
fn exchange(line: &str, timeout: Duration) -> anyhow::Result<String> {
    exchange_at(&format!("{GUEST_IP}:7070"), line, timeout)
}

/// One request/reply with the guest service at `addr`, on a fresh
/// connection.
fn exchange_at(addr: &str, line: &str, timeout: Duration) -> anyhow::Result<String> {
    let addr: SocketAddr = addr.parse()?;
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    (&s).write_all(format!("{line}\n").as_bytes())?;
    let mut r = BufReader::new(s);
    let mut reply = String::new();
    r.read_line(&mut reply)?;
    Ok(reply.trim_end().to_string())
}
