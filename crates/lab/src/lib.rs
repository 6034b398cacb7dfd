//! `tandem drill`: the failover drill, on this one machine.
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

pub mod bench;
pub mod checker;
pub mod colobench;
pub mod ppsbench;
pub mod switchbench;
pub mod topology;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use tandem_api::{FtRole, FtStatus, VmInfo};

use checker::{Delivered, Violation};
use topology::{Topology, GUEST_IP, REPL_B, UPLINK_A, UPLINK_B};

/// Pages of guest memory the churn workload keeps rewriting (16 MiB).
const CHURN_PAGES: usize = 4096;

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
        let r = run_round(opts, round, kill, &mut rng, &mut say)
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
                // SAFETY: kill(2) of the tandemd this drill started.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
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
            // SAFETY: kill(2); the process runs on this drill's state.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
                libc::kill(pid, libc::SIGKILL);
            }
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

/// What the client thread shares with the drill.
#[derive(Default)]
struct ClientShared {
    delivered: Mutex<Vec<Delivered>>,
    discarded: Mutex<usize>,
    killed: AtomicBool,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
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
    b_args.extend(["--repl-listen", repl.as_str()]);
    let b = Host::start("b", &topo.b, UPLINK_B, opts, &work, &b_args)?;
    let a = Host::start("a", &topo.a, UPLINK_A, opts, &work, &timeouts)?;

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
    let api_a = a.api();
    let _: VmInfo =
        block_on(api_a.post("/v1/vms", &tandem_api::CreateVmRequest { spec_toml: spec }))?;
    let _: VmInfo = block_on(api_a.post("/v1/vms/drill/start", &()))?;
    wait_for("guest ready on A", Duration::from_secs(120), || {
        let c: tandem_api::ConsoleChunk =
            block_on(api_a.get("/v1/vms/drill/console?offset=0")).ok()?;
        c.data.contains("TANDEM-GUEST-READY").then_some(())
    })?;
    Ok(Site {
        work,
        topo,
        a,
        b,
        repl,
    })
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
            tracker: None,
            unsafe_no_clamp: opts.unsafe_no_clamp,
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

fn run_round(
    opts: &DrillOptions,
    round: u32,
    kill: KillMode,
    rng: &mut Rng,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<RoundReport> {
    let tag = format!("{}{}", std::process::id() % 100_000, round);
    let Site {
        work,
        topo,
        mut a,
        b,
        repl,
    } = bring_up(opts, &tag)?;
    let api_a = a.api();
    protect(&a, &b, &repl, opts, opts.epoch_ms)?;
    say(&format!("  protected; client workload from {}", topo.c));
    // Memory churn in the guest: after failover it checks that every page
    // it wrote came across whole (a missed dirty page shows up as stale).
    let churn = topology::spawn_in_ns(&topo.c, || {
        exchange(&format!("CHURN {CHURN_PAGES}"), Duration::from_secs(5))
    })?
    .join()
    .map_err(|_| anyhow!("churn thread panicked"))??
    .map_err(|e| anyhow!("starting the memory churn: {e}\n{}", host_state(&api_a)))?;
    if !churn.starts_with("CHURNING") {
        bail!("guest refused the memory churn: {churn}");
    }

    let shared = Arc::new(ClientShared::default());
    let client = {
        let shared = shared.clone();
        topology::spawn_in_ns(&topo.c, move || client_loop(&shared, round))?
    };
    let upload = Arc::new(UploadShared::default());
    let uploader = {
        let upload = upload.clone();
        topology::spawn_in_ns(&topo.c, move || upload_loop(&upload))?
    };
    let kill_after = 5 + rng.below(15) as usize;
    let delivered_before = wait_for("client replies", Duration::from_secs(120), || {
        if let Some(e) = shared.error.lock().ok()?.clone() {
            return Some(Err(e));
        }
        let n = shared.delivered.lock().ok()?.len();
        (n >= kill_after).then_some(Ok(n))
    })
    .map_err(|e| anyhow!("{e}\n{}", host_state(&api_a)))?
    .map_err(|e| anyhow!("client: {e}"))?;
    std::thread::sleep(Duration::from_millis(rng.below(300)));
    let before = ft_primary(&a).unwrap_or_default();
    let pid = block_on(api_a.get::<VmInfo>("/v1/vms/drill"))?
        .pid
        .ok_or_else(|| anyhow!("no QEMU pid on A"))?;

    // Host A's view just before the kill, kept for a failed round's report.
    let diagnostics = format!("host A before the kill:\n{}", host_state(&api_a));
    // The adversarial moment: right after the client has seen new upload
    // bytes acknowledged. With clamping, acknowledgements only move when an
    // epoch commits, so they are safe; an acknowledgement released early
    // is then almost certainly for bytes no commit holds yet.
    let seen = upload.acked.load(Ordering::SeqCst);
    // The upload can stall for a while (a busy TCG guest); a kill during a
    // stall would find everything acknowledged long since committed.
    let watch_until = Instant::now() + Duration::from_secs(20);
    while upload.acked.load(Ordering::SeqCst) == seen && Instant::now() < watch_until {
        std::thread::sleep(Duration::from_millis(1));
    }
    let t_kill = Instant::now();
    match kill {
        // SAFETY: kill(2) of host A's QEMU, started by this drill.
        KillMode::Qemu => unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        },
        KillMode::Network => topo.isolate_a()?,
        KillMode::Tandemd => a.kill(),
    }
    shared.killed.store(true, Ordering::SeqCst);
    // Replies from here on can only come from B: a request A took in but
    // never answered is answered by the resumed guest after failover.
    let upload_acked_at_kill = upload.acked.load(Ordering::SeqCst);
    let delivered_at_kill = shared.delivered.lock().map(|d| d.len()).unwrap_or_default();
    say(&format!(
        "  killed {kill:?} after {delivered_before} replies"
    ));

    let st = wait_for("takeover on B", Duration::from_secs(60), || {
        let s = ft_backup(&b).ok()?;
        (s.state.as_str() == "failed-over").then_some(s)
    })
    .with_context(|| format!("B's log:\n{}", tail(&b.log, 15)))?;
    let report = st.failover.clone().unwrap_or_default();

    // The client reconnects to the guest, now on B.
    let served = wait_for("client served by B", Duration::from_secs(60), || {
        let r =
            topology::spawn_in_ns(&topo.c, || exchange("PING", Duration::from_millis(500))).ok()?;
        match r.join().ok()?.ok()? {
            Ok(l) if l == "PONG" => Some(t_kill.elapsed()),
            _ => None,
        }
    })?;
    shared.stop.store(true, Ordering::SeqCst);
    let _ = client.join();
    // Every byte the client saw acknowledged must reach the resumed guest:
    // the stream continues on B from the committed state, so the guest's
    // count must pass what the client was told, with no gap.
    let acked_at_check = upload.acked.load(Ordering::SeqCst);
    say(&format!(
        "  upload: {} bytes written, {} acknowledged at the kill, {} now{}",
        upload.written.load(Ordering::SeqCst),
        upload_acked_at_kill,
        acked_at_check,
        upload
            .ended
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    ));
    let upload_check = topology::spawn_in_ns(&topo.c, move || -> anyhow::Result<(u64, u64)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = exchange("UPSTAT", Duration::from_secs(2))?;
            let mut it = r.split_whitespace().skip(1).map(|n| n.parse::<u64>());
            let (Some(Ok(got)), Some(Ok(bad))) = (it.next(), it.next()) else {
                bail!("bad UPSTAT reply {r:?}");
            };
            if (got >= acked_at_check && bad == 0) || bad > 0 || Instant::now() > deadline {
                return Ok((got, bad));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })?
    .join()
    .map_err(|_| anyhow!("upload check panicked"))??;
    upload.stop.store(true, Ordering::SeqCst);
    let _ = uploader.join();
    let upload_error = upload.error.lock().map(|e| e.clone()).unwrap_or(None);
    let delivered = shared
        .delivered
        .lock()
        .map(|d| d.clone())
        .unwrap_or_default();
    let discarded = shared.discarded.lock().map(|d| *d).unwrap_or(0);

    // The resumed VM must know every delivered reply.
    let (answers, last, continued, memory) = {
        let delivered = delivered.clone();
        topology::spawn_in_ns(&topo.c, move || -> anyhow::Result<_> {
            let memory = exchange("VERIFY", Duration::from_secs(30))?;
            let mut answers = BTreeMap::new();
            for d in &delivered {
                answers.insert(
                    d.seq,
                    exchange(&format!("GET {}", d.seq), Duration::from_secs(5))?,
                );
            }
            let last: u64 = exchange("LAST", Duration::from_secs(5))?
                .strip_prefix("LAST ")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow!("bad LAST reply"))?;
            // And the client continues against the new primary.
            let mut continued = 0;
            for n in 0..3 {
                let r = exchange(
                    &format!("PUT after-failover-{round}-{n}"),
                    Duration::from_secs(5),
                )?;
                if r.starts_with("OK ") {
                    continued += 1;
                }
            }
            Ok((answers, last, continued, memory))
        })?
        .join()
        .map_err(|_| anyhow!("verification thread panicked"))???
    };
    let mut violations: Vec<Violation> = checker::check_vm(&delivered, &answers, last);

    // Every acknowledged record must be on the replica disk as committed.
    // Records acknowledged before the kill must be in the replica exactly
    // as committed; those B acknowledged after failover, on the disk the
    // resumed guest runs on (a copy of the replica it has written since).
    let (before_kill, after_kill) = delivered.split_at(delivered_at_kill.min(delivered.len()));
    let replica_disk = b.state.join("replicas/drill/disk-data.raw");
    match read_records(&replica_disk, &work) {
        Ok(log) => violations.extend(checker::check_disk(before_kill, &log)),
        Err(e) => bail!("reading the replica disk: {e:#}"),
    }
    if !after_kill.is_empty() {
        let live = find_file(&b.state.join("vms"), "restored-disk-data.raw").ok_or_else(|| {
            anyhow!(
                "B's running copy of the disk is not under {}",
                b.state.display()
            )
        })?;
        match read_records(&live, &work) {
            Ok(log) => violations.extend(checker::check_disk(after_kill, &log)),
            Err(e) => bail!("reading B's running disk: {e:#}"),
        }
    }
    let mut violations: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
    if !memory.starts_with("VERIFIED") {
        violations.push(format!(
            "the resumed guest's memory is inconsistent: {memory}"
        ));
    }
    let mut upload_received = 0;
    match (upload_error, upload_check) {
        (Some(e), _) => violations.push(format!("the upload stream could not start: {e}")),
        (None, Ok((got, bad))) => {
            upload_received = got;
            if upload_acked_at_kill == 0 {
                violations.push(
                    "the upload stream made no progress before the kill, so it proves nothing"
                        .to_string(),
                );
            }
            if bad > 0 {
                violations.push(format!(
                    "the resumed guest saw a gap or corruption in the upload stream ({bad} mismatch)"
                ));
            } else if got < acked_at_check {
                violations.push(format!(
                    "the client saw {acked_at_check} upload bytes acknowledged; the resumed guest has only {got} and the stream does not recover"
                ));
            }
        }
        (None, Err(e)) => violations.push(format!("checking the upload stream: {e:#}")),
    }
    if continued < 3 {
        violations.push(format!(
            "the client could not continue: {continued}/3 writes after failover"
        ));
    }
    drop(a);
    drop(b);
    drop(topo);
    if violations.is_empty() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        // Keep the evidence: daemon logs, the replica, the VM records.
        let _ = std::fs::write(work.join("diagnostics.txt"), &diagnostics);
        say(&format!("  evidence kept in {}", work.display()));
    }
    Ok(RoundReport {
        round,
        kill: Some(kill),
        kill_after_replies: delivered_before,
        replies_delivered: delivered.len(),
        replies_discarded: discarded,
        epochs_committed: before.last_committed,
        pause_p50_ms: before.pause_p50_ms,
        pause_p99_ms: before.pause_p99_ms,
        detection_ms: report.detection_ms,
        fence_wait_ms: report.fence_wait_ms,
        restore_ms: report.restore_ms,
        client_served_ms: served.as_secs_f64() * 1e3,
        continued_records: continued,
        upload_acked: acked_at_check,
        upload_received,
        memory_check: memory,
        passed: violations.is_empty(),
        violations,
    })
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

/// The client: numbered durable writes. Host A's switch holds each reply
/// until the epoch that produced it is committed (output commit); what
/// arrives here is what a real client would have been told.
fn client_loop(shared: &ClientShared, round: u32) {
    let mut n = 0u64;
    let started = Instant::now();
    while !shared.killed.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
        if started.elapsed() > Duration::from_secs(300) {
            break;
        }
        n += 1;
        let text = format!("r{round}-{n}");
        let reply = match exchange(&format!("PUT {text}"), Duration::from_secs(5)) {
            Ok(r) => r,
            Err(_) => {
                *shared.discarded.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(seq) = reply
            .strip_prefix("OK ")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        shared
            .delivered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Delivered { seq, text });
    }
}

/// The upload client: streams the guest service's upload pattern to port
/// 7071 and records how many bytes its own TCP stack has seen
/// acknowledged (bytes written minus what is still queued unacknowledged).
/// The guest answers with progress lines on the same connection: `pass`
/// segments under `bulk-tcp`, carrying acknowledgements that output commit
/// must clamp.
fn upload_loop(shared: &UploadShared) {
    use std::os::fd::AsRawFd;
    let addr: SocketAddr = match format!("{GUEST_IP}:7071").parse() {
        Ok(a) => a,
        Err(_) => return,
    };
    let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            *shared.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            return;
        }
    };
    let _ = s.set_nonblocking(true);
    let mut written: u64 = 0;
    let mut chunk = vec![0u8; 2048];
    let mut sink = [0u8; 4096];
    let started = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(600) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = tandem_guest_pattern(written + i as u64);
        }
        match (&s).write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                *shared.ended.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("write failed after {written} bytes: {e}"));
                break;
            }
        }
        shared.written.store(written, Ordering::SeqCst);
        // Progress lines are only there to carry acknowledgements.
        while let Ok(n) = (&s).read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int: the bytes this socket still
        // holds unacknowledged.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } == 0 {
            let acked = written.saturating_sub(queued.max(0) as u64);
            shared.acked.fetch_max(acked, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The guest service's upload pattern (`proto::upload_byte` there).
fn tandem_guest_pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

#[derive(Default)]
struct UploadShared {
    acked: std::sync::atomic::AtomicU64,
    written: std::sync::atomic::AtomicU64,
    ended: Mutex<Option<String>>,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

/// The first file called `name` under `dir` (bounded depth).
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == name) {
                return Some(p);
            }
            if depth < 4 && p.is_dir() {
                stack.push((p, depth + 1));
            }
        }
    }
    None
}

/// The record log on an ext4 disk image, read without mounting: a copy is
/// made, its journal replayed (`e2fsck`), and the file read with `debugfs`.
fn read_records(disk: &Path, work: &Path) -> anyhow::Result<String> {
    let copy = work.join("replica-check.raw");
    std::fs::copy(disk, &copy).with_context(|| format!("copying {}", disk.display()))?;
    let fsck = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&copy)
        .output()
        .context("running e2fsck")?;
    // 0: clean, 1: errors corrected (journal replayed); more is a damaged fs.
    if fsck.status.code().is_none_or(|c| c > 1) {
        bail!(
            "e2fsck found the replica filesystem damaged: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    let out = Command::new("debugfs")
        .args(["-R", "cat /records.log"])
        .arg(&copy)
        .output()
        .context("running debugfs")?;
    let _ = std::fs::remove_file(&copy);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
