//! `tandem bench cluster`: a real tandem-manager and N light hosts
//! (tandemds without VMs) on this machine, joined with tokens.
//!
//! Everything runs on 127.0.0.1 in a temporary directory
//! (`WORK/tcluster-PID`): the manager's state directory (`tandem cluster
//! init`), one state directory, API socket and switch document per host.
//! Measured, in order:
//!
//! 1. **join**: per host, `tandem token create` then `tandem host join`
//!    (spawned, timed to exit with `identity/identity.pem` on disk),
//!    one host after the other;
//! 2. **first report**: all N tandemds started at once; per host, from its
//!    spawn until the manager lists it `online` with an inventory;
//! 3. **steady state**: a fixed window with nobody calling the manager but
//!    the hosts' agents (heartbeat every 5 s, inventory every 60 s: the
//!    agent's fixed intervals); the manager's CPU time (utime + stime) and
//!    RSS from `/proc/PID`, and the hosts' CPU for comparison;
//! 4. **inventory refresh**: every host's switch gets a new port group at
//!    once (a switch transaction and its commit on the host's API socket);
//!    per host, until `tandem host list` (`GET /v1/hosts`) shows it. The
//!    agent sends its inventory every 60 s, so this measures that interval
//!    (expected spread 0..65 s), not the manager;
//! 5. **inventory after a manager restart**: another port group on every
//!    host, then the manager restarted; per host, from the manager
//!    answering again until its inventory shows the new group. The
//!    manager asks each host for its inventory in the answer to its first
//!    heartbeat, so this is heartbeat → inventory → visible (bounded by
//!    the 5 s heartbeat).
//!
//! Every process started here is stopped (SIGTERM, then SIGKILL) and the
//! directory removed on every exit path, SIGINT and SIGTERM included.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Options {
    pub hosts: usize,
    /// The steady-state window, seconds.
    pub window_s: u64,
    /// Bound on each inventory measurement, seconds.
    pub refresh_timeout_s: u64,
    pub tandemd: PathBuf,
    pub image_dir: PathBuf,
    pub work_dir: PathBuf,
}

/// p50 / p99 / max of one set of samples, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dist {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Dist {
    pub fn of(v: &[f64]) -> Dist {
        Dist {
            n: v.len(),
            p50_ms: pct(v, 50.0),
            p99_ms: pct(v, 99.0),
            max_ms: v.iter().copied().fold(0.0, f64::max),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub hosts: usize,
    /// The agent's intervals (fixed in `AgentConfig::new`).
    pub heartbeat_s: u64,
    pub inventory_every_s: u64,
    pub token_create: Dist,
    pub join: Dist,
    /// Wall time of all tokens and joins, one host after the other.
    pub join_total_s: f64,
    /// tandemd spawned → listed online with an inventory.
    pub first_report: Dist,
    pub first_report_all_s: f64,
    pub window_s: f64,
    pub manager_cpu_ms: f64,
    /// Manager CPU, percent of one core, over the window.
    pub manager_cpu_pct: f64,
    /// Manager CPU per heartbeat expected in the window (hosts × window / 5 s).
    pub manager_cpu_us_per_heartbeat: f64,
    pub manager_rss_kib: u64,
    pub manager_rss_max_kib: u64,
    pub manager_hwm_kib: u64,
    /// All tandemds together, percent of one core, over the window.
    pub hosts_cpu_pct: f64,
    pub host_rss_avg_kib: u64,
    /// Switch change on the host → visible at the manager (periodic inventory).
    pub refresh: Dist,
    pub refresh_missing: usize,
    /// Manager answering after a restart → the host's changed inventory visible.
    pub after_restart: Dist,
    pub after_restart_missing: usize,
    pub manager_restart_ms: f64,
}

// ------------------------------------------------------------ helpers

pub(super) fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM end the run through the error path, so every process is
/// stopped and every directory removed by the guards' `Drop`.
pub(super) fn install_signal_handlers() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        let _ = unsafe { signal(sig, SigHandler::Handler(on_signal)) };
    }
}

pub(super) fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d` in short steps, failing at once when interrupted.
pub(super) fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    check_interrupted()
}

pub(super) fn wait_for<T>(
    what: &str,
    timeout: Duration,
    step: Duration,
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
        sleep(step)?;
    }
}

pub(super) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(f)
}

pub(super) fn tail(log: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A binary installed next to this one (`tandem`, `tandem-manager`).
pub(super) fn beside_lab(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .map(|d| d.join(name))
        .context("locating the lab's directory")?;
    if !p.is_file() {
        bail!(
            "{} not found: build it (cargo build --release -p tandem-cli -p tandem-manager)",
            p.display()
        );
    }
    Ok(p)
}

/// utime + stime of a process, milliseconds.
pub(super) fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some(ticks as f64 * 1000.0 / hz)
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
pub(super) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A child of this bench: SIGTERM, up to `grace`, then SIGKILL.
pub(super) fn stop_child(c: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = c.try_wait() {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// [`tandem_lab::bounded::run_bounded`], stopped by an interrupt, as
/// (status, stdout, stderr).
pub(super) fn run_bounded(
    cmd: Command,
    dir: &Path,
    timeout: Duration,
) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
    let out =
        tandem_lab::bounded::run_bounded(cmd, dir, timeout, &|| INTERRUPTED.load(Ordering::SeqCst));
    check_interrupted()?;
    let out = out?;
    Ok((out.status, out.stdout, out.stderr))
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ------------------------------------------------------------ the lab

/// Everything this run started; stopped and removed on drop. Shared with
/// `bench dvs` (which runs the manager and hosts in network namespaces).
pub(super) struct Lab {
    pub(super) dir: PathBuf,
    ram_dir: PathBuf,
    tandem: PathBuf,
    manager_bin: PathBuf,
    manager: Option<Child>,
    manager_log: PathBuf,
    pub(super) addr: String,
    /// The network namespace the manager and the operator's CLI run in
    /// (`None`: this process's).
    netns: Option<String>,
    pub(super) hosts: Vec<HostProc>,
}

pub(super) struct HostProc {
    pub(super) name: String,
    pub(super) state: PathBuf,
    pub(super) socket: PathBuf,
    /// The network namespace its tandemd (and its join) run in.
    netns: Option<String>,
    child: Option<Child>,
}

/// `bin`, or `ip netns exec NS bin` (which execs it in place: the child's
/// pid is the program's).
pub(super) fn command_in(netns: Option<&str>, bin: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// Does a TCP connection to `addr` open, from `netns` (a thread that
/// entered it) or from here?
fn tcp_answers(netns: Option<&str>, addr: &str) -> bool {
    let Ok(sa) = addr.parse::<std::net::SocketAddr>() else {
        return false;
    };
    let connect = move || std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1)).is_ok();
    match netns {
        None => connect(),
        Some(ns) => {
            let path = format!("/var/run/netns/{ns}");
            std::thread::spawn(move || {
                let Ok(f) = std::fs::File::open(&path) else {
                    return false;
                };
                // Only this fresh thread changes namespace.
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).is_ok() && connect()
            })
            .join()
            .unwrap_or(false)
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Hosts first (their agents would only retry a missing manager).
        for h in &mut self.hosts {
            if let Some(c) = h.child.as_mut() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for h in &mut self.hosts {
            if let Some(mut c) = h.child.take() {
                stop_child(&mut c, Duration::from_secs(10));
            }
        }
        if let Some(mut m) = self.manager.take() {
            stop_child(&mut m, Duration::from_secs(15));
        }
        let _ = std::fs::remove_dir_all(&self.ram_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    /// A lab in `work_dir/TAG-PID` (RAM directory `/dev/shm/TAG-PID`):
    /// the manager at `addr` (in `netns`), and `hosts` (name, namespace),
    /// nothing started yet.
    pub(super) fn new(
        tag: &str,
        work_dir: &Path,
        addr: String,
        netns: Option<String>,
        hosts: Vec<(String, Option<String>)>,
    ) -> anyhow::Result<Lab> {
        let tandem = beside_lab("tandem")?;
        let manager_bin = beside_lab("tandem-manager")?;
        let dir = work_dir.join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let lab = Lab {
            ram_dir: PathBuf::from(format!("/dev/shm/{tag}-{}", std::process::id())),
            tandem,
            manager_bin,
            manager: None,
            manager_log: dir.join("manager.log"),
            addr,
            netns,
            hosts: hosts
                .into_iter()
                .map(|(name, netns)| HostProc {
                    state: dir.join(&name),
                    socket: dir.join(format!("{name}.sock")),
                    name,
                    netns,
                    child: None,
                })
                .collect(),
            dir,
        };
        std::fs::create_dir_all(&lab.ram_dir)?;
        Ok(lab)
    }

    /// `tandem` as the cluster's operator (in the manager's namespace).
    pub(super) fn cli(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        self.cli_in(self.netns.as_deref(), args, timeout)
    }

    /// `tandem` as the cluster's operator, in `netns`.
    pub(super) fn cli_in(
        &self,
        netns: Option<&str>,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let (st, out, err) = self.cli_status(netns, args, timeout)?;
        if !st.success() {
            bail!("tandem {}: {st}: {}", args.join(" "), err.trim());
        }
        Ok(out)
    }

    /// `tandem ARGS` as the operator in `netns`: exit status, stdout, stderr.
    pub(super) fn cli_status(
        &self,
        netns: Option<&str>,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
        let mut cmd = command_in(netns, &self.tandem);
        cmd.env("TANDEM_IDENTITY", self.operator())
            .env_remove("TANDEM_MANAGER")
            .env_remove("TANDEM_MANAGER_NAME")
            .args(args);
        run_bounded(cmd, &self.dir, timeout)
    }

    /// The operator identity `cluster init` made.
    pub(super) fn operator(&self) -> PathBuf {
        self.dir.join("manager/operator")
    }

    /// The manager's (and the operator CLI's) network namespace.
    pub(super) fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    pub(super) fn manager_log(&self) -> &Path {
        &self.manager_log
    }

    /// `tandem cluster init` of cluster `name` for the manager's address.
    pub(super) fn init_cluster(&self, name: &str) -> anyhow::Result<()> {
        let mdir = self.dir.join("manager").to_string_lossy().into_owned();
        self.cli(
            &[
                "cluster",
                "init",
                "--state-dir",
                &mdir,
                "--name",
                name,
                "--listen",
                &self.addr,
                "--advertise",
                &self.addr,
            ],
            Duration::from_secs(60),
        )?;
        Ok(())
    }

    /// A token, then `tandem host join` from the host's namespace into its
    /// state directory: (token ms, join ms).
    pub(super) fn join_host(&self, i: usize) -> anyhow::Result<(f64, f64)> {
        let t = Instant::now();
        let token = self.cli(&["token", "create"], Duration::from_secs(30))?;
        let token = token.trim().to_string();
        let token_ms = t.elapsed().as_secs_f64() * 1e3;
        let h = &self.hosts[i];
        std::fs::create_dir_all(&h.state)?;
        let t = Instant::now();
        let state = h.state.to_string_lossy().into_owned();
        self.cli_in(
            h.netns.as_deref(),
            &[
                "host",
                "join",
                &self.addr,
                "--token",
                &token,
                "--name",
                &h.name,
                "--state-dir",
                &state,
            ],
            Duration::from_secs(60),
        )?;
        let id = h.state.join("identity/identity.pem");
        if !id.is_file() {
            bail!("{}: no certificate after the join", id.display());
        }
        Ok((token_ms, t.elapsed().as_secs_f64() * 1e3))
    }

    pub(super) fn start_manager(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.manager_log)?;
        let child = command_in(self.netns.as_deref(), &self.manager_bin)
            .arg("--state-dir")
            .arg(self.dir.join("manager"))
            .arg("--listen")
            .arg(&self.addr)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting tandem-manager")?;
        self.manager = Some(child);
        let log = self.manager_log.clone();
        let netns = self.netns.clone();
        let mgr = self.manager.as_mut().expect("just set");
        wait_for(
            "tandem-manager answering",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                if let Ok(Some(st)) = mgr.try_wait() {
                    return Some(Err(anyhow::anyhow!(
                        "tandem-manager exited ({st}): {}",
                        tail(&log, 10)
                    )));
                }
                tcp_answers(netns.as_deref(), &self.addr).then_some(Ok(()))
            },
        )??;
        Ok(())
    }

    /// Stops the manager (SIGTERM, then SIGKILL after 15 s).
    pub(super) fn stop_manager(&mut self) {
        if let Some(mut m) = self.manager.take() {
            stop_child(&mut m, Duration::from_secs(15));
        }
    }

    fn manager_pid(&self) -> anyhow::Result<u32> {
        self.manager
            .as_ref()
            .map(Child::id)
            .context("the manager is not running")
    }

    /// Starts host `i`'s tandemd (in its namespace) on switch document
    /// `doc`, with `extra` arguments; stops it first if it runs.
    pub(super) fn start_host_with(
        &mut self,
        i: usize,
        tandemd: &Path,
        image_dir: &Path,
        doc: &str,
        extra: &[String],
    ) -> anyhow::Result<()> {
        let h = &mut self.hosts[i];
        if let Some(mut c) = h.child.take() {
            stop_child(&mut c, Duration::from_secs(10));
        }
        std::fs::create_dir_all(&h.state)?;
        let switch = h.state.join("bench-switch.toml");
        std::fs::write(&switch, doc)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", h.name)))?;
        let child = command_in(h.netns.as_deref(), tandemd)
            .arg("--state-dir")
            .arg(&h.state)
            .arg("--socket")
            .arg(&h.socket)
            .arg("--ram-dir")
            .arg(&self.ram_dir)
            .arg("--image-dir")
            .arg(image_dir)
            .arg("--switch-config")
            .arg(&switch)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting tandemd")?;
        h.child = Some(child);
        Ok(())
    }

    fn start_host(&mut self, i: usize, tandemd: &Path, image_dir: &Path) -> anyhow::Result<()> {
        self.start_host_with(i, tandemd, image_dir, &switch_doc(&[]), &[])
    }

    /// Waits (bounded) until host `i`'s tandemd answers on its socket.
    pub(super) fn wait_host_socket(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let log = self.host_log(i);
        let h = &mut self.hosts[i];
        let (name, socket) = (h.name.clone(), h.socket.clone());
        wait_for(
            &format!("tandemd {name} listening"),
            timeout,
            Duration::from_millis(25),
            || {
                if let Some(Ok(Some(st))) = h.child.as_mut().map(|c| c.try_wait()) {
                    return Some(Err(anyhow::anyhow!(
                        "tandemd {name} exited ({st}): {}",
                        tail(&log, 10)
                    )));
                }
                std::os::unix::net::UnixStream::connect(&socket)
                    .ok()
                    .map(|_| Ok(()))
            },
        )?
    }

    pub(super) fn host_log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.log", self.hosts[i].name))
    }

    /// The manager's host list, by name.
    pub(super) fn host_list(&self) -> anyhow::Result<Vec<Value>> {
        let out = self.cli(
            &["--json", "host", "list", "--timeout", "10s"],
            Duration::from_secs(15),
        )?;
        let v: Value = serde_json::from_str(&out).context("parsing `tandem host list --json`")?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

/// The switch document a bench host runs: port group `vms` and `extra`.
fn switch_doc(extra: &[String]) -> String {
    let mut doc = String::from("[[port_group]]\nname = \"vms\"\nvlan = 10\n");
    for (n, g) in extra.iter().enumerate() {
        doc.push_str(&format!(
            "\n[[port_group]]\nname = \"{g}\"\nvlan = {}\n",
            100 + n
        ));
    }
    doc
}

/// Changes a host's switch: a plain apply, or where a manager manages the
/// switch (apply refused), a switch transaction and its commit.
fn change_switch(socket: &Path, doc: &str) -> anyhow::Result<()> {
    let c = tandem_api::Client::new(socket);
    let body = tandem_api::SwitchDocumentBody {
        document_toml: doc.to_string(),
    };
    let applied: Result<Value, _> = block_on(c.post("/v1/switch/apply", &body));
    if applied.is_ok() {
        return Ok(());
    }
    let txid = format!(
        "bench-{}",
        now_unix() as u64 ^ u64::from(std::process::id())
    );
    let _: Value = block_on(c.post(
        "/v1/switch/txn",
        &serde_json::json!({ "txid": txid, "document_toml": doc, "timeout_s": 30 }),
    ))
    .with_context(|| {
        format!(
            "changing the switch of {} (apply: {})",
            socket.display(),
            applied.err().map(|e| e.to_string()).unwrap_or_default()
        )
    })?;
    let _: Value = block_on(c.post("/v1/switch/commit", &serde_json::json!({ "txid": txid })))
        .context("committing the switch transaction")?;
    Ok(())
}

fn has_port_group(h: &Value, group: &str) -> bool {
    h["inventory"]["port_groups"]
        .as_array()
        .is_some_and(|g| g.iter().any(|g| g["name"] == group))
}

/// Polls the manager's host list every 250 ms until every host shows
/// `group`, at most `timeout`; per host, ms from `t0`.
fn time_until_visible(
    lab: &Lab,
    group: &dyn Fn(&str) -> String,
    t0: Instant,
    timeout: Duration,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let mut seen: std::collections::BTreeMap<String, f64> = Default::default();
    let deadline = Instant::now() + timeout;
    while seen.len() < lab.hosts.len() && Instant::now() < deadline {
        check_interrupted()?;
        let polled_at = Instant::now();
        let list = lab.host_list()?;
        // The poll's start: the change is visible no later than then.
        let at = polled_at.duration_since(t0).as_secs_f64() * 1e3;
        for h in &list {
            let Some(name) = h["name"].as_str() else {
                continue;
            };
            if !seen.contains_key(name) && has_port_group(h, &group(name)) {
                seen.insert(name.to_string(), at);
            }
        }
        sleep(Duration::from_millis(250).saturating_sub(polled_at.elapsed()))?;
    }
    let missing = lab.hosts.len() - seen.len();
    Ok((seen.into_values().collect(), missing))
}

pub fn run(o: &Options, mut say: impl FnMut(&str)) -> anyhow::Result<Report> {
    if o.hosts == 0 || o.hosts > 256 {
        bail!("--hosts: 1 to 256");
    }
    if !o.tandemd.is_file() {
        bail!("tandemd not found at {}", o.tandemd.display());
    }
    install_signal_handlers();
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut lab = Lab::new(
        "tcluster",
        &o.work_dir,
        addr.clone(),
        None,
        (0..o.hosts).map(|i| (format!("h{i:03}"), None)).collect(),
    )?;
    let mut r = Report {
        hosts: o.hosts,
        heartbeat_s: 5,
        inventory_every_s: 60,
        ..Report::default()
    };

    say(&format!("cluster init, manager on {addr}"));
    lab.init_cluster("bench")?;
    lab.start_manager()?;

    // 1. Joins, one host after the other.
    say(&format!("joining {} hosts", o.hosts));
    let (mut tokens, mut joins) = (Vec::new(), Vec::new());
    let all = Instant::now();
    for i in 0..o.hosts {
        check_interrupted()?;
        let (t, j) = lab.join_host(i)?;
        tokens.push(t);
        joins.push(j);
    }
    r.join_total_s = all.elapsed().as_secs_f64();
    r.token_create = Dist::of(&tokens);
    r.join = Dist::of(&joins);
    say(&format!(
        "joins: p50 {:.0} ms, p99 {:.0} ms, all {:.1} s",
        r.join.p50_ms, r.join.p99_ms, r.join_total_s
    ));

    // 2. All tandemds at once; each until it is online with an inventory.
    say(&format!("starting {} tandemds", o.hosts));
    let mut started = Vec::new();
    for i in 0..o.hosts {
        check_interrupted()?;
        started.push(Instant::now());
        lab.start_host(i, &o.tandemd, &o.image_dir)?;
    }
    let mut first: Vec<Option<f64>> = vec![None; o.hosts];
    let t_all = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    while first.iter().any(Option::is_none) {
        check_interrupted()?;
        if Instant::now() > deadline {
            let late: Vec<&str> = (0..o.hosts)
                .filter(|&i| first[i].is_none())
                .map(|i| lab.hosts[i].name.as_str())
                .collect();
            bail!(
                "hosts not online with an inventory within 120 s: {late:?}; {}'s log:\n{}",
                late[0],
                tail(&lab.dir.join(format!("{}.log", late[0])), 10)
            );
        }
        for h in &mut lab.hosts {
            if let Some(Ok(Some(st))) = h.child.as_mut().map(|c| c.try_wait()) {
                bail!(
                    "tandemd {} exited ({st}): {}",
                    h.name,
                    tail(&lab.dir.join(format!("{}.log", h.name)), 10)
                );
            }
        }
        let polled = Instant::now();
        for h in lab.host_list()? {
            let Some(i) = h["name"]
                .as_str()
                .and_then(|n| n.strip_prefix('h'))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&i| i < o.hosts)
            else {
                continue;
            };
            if first[i].is_none() && h["connection"] == "online" && !h["inventory"].is_null() {
                first[i] = Some(polled.duration_since(started[i]).as_secs_f64() * 1e3);
            }
        }
        sleep(Duration::from_millis(250))?;
    }
    r.first_report_all_s = t_all.elapsed().as_secs_f64();
    r.first_report = Dist::of(&first.iter().flatten().copied().collect::<Vec<_>>());

    // 3. Steady state: only the agents talk to the manager.
    say(&format!(
        "steady state: {} s with only the agents' heartbeats",
        o.window_s
    ));
    // One heartbeat period for the start-up burst to pass.
    sleep(Duration::from_secs(5))?;
    let mpid = lab.manager_pid()?;
    let pids: Vec<u32> = lab
        .hosts
        .iter()
        .filter_map(|h| h.child.as_ref().map(Child::id))
        .collect();
    let hosts_cpu = |pids: &[u32]| pids.iter().filter_map(|&p| cpu_ms(p)).sum::<f64>();
    let (m0, h0, t0) = (
        cpu_ms(mpid).context("manager CPU")?,
        hosts_cpu(&pids),
        Instant::now(),
    );
    let mut rss_max = 0;
    while t0.elapsed() < Duration::from_secs(o.window_s) {
        rss_max = rss_max.max(status_kib(mpid, "VmRSS").unwrap_or(0));
        sleep(Duration::from_millis(500))?;
    }
    let (m1, h1) = (cpu_ms(mpid).context("manager CPU")?, hosts_cpu(&pids));
    r.window_s = t0.elapsed().as_secs_f64();
    r.manager_cpu_ms = m1 - m0;
    r.manager_cpu_pct = r.manager_cpu_ms / (r.window_s * 10.0);
    let beats = o.hosts as f64 * r.window_s / r.heartbeat_s as f64;
    r.manager_cpu_us_per_heartbeat = r.manager_cpu_ms * 1e3 / beats;
    r.manager_rss_kib = status_kib(mpid, "VmRSS").unwrap_or(0);
    r.manager_rss_max_kib = rss_max.max(r.manager_rss_kib);
    r.manager_hwm_kib = status_kib(mpid, "VmHWM").unwrap_or(0);
    r.hosts_cpu_pct = (h1 - h0) / (r.window_s * 10.0);
    r.host_rss_avg_kib = pids
        .iter()
        .filter_map(|&p| status_kib(p, "VmRSS"))
        .sum::<u64>()
        / pids.len().max(1) as u64;

    // 4. A switch change on every host → visible at the manager.
    say("inventory refresh: a new port group on every host");
    let g1 = |name: &str| format!("bench-{name}");
    let t = Instant::now();
    for h in &lab.hosts {
        change_switch(&h.socket, &switch_doc(&[g1(&h.name)]))?;
    }
    let (v, missing) = time_until_visible(&lab, &g1, t, Duration::from_secs(o.refresh_timeout_s))?;
    r.refresh = Dist::of(&v);
    r.refresh_missing = missing;

    // 5. Another change, then the manager restarted: each host's first
    // heartbeat is told to send its inventory.
    say("inventory after a manager restart");
    let g2 = |name: &str| format!("again-{name}");
    for h in &lab.hosts {
        change_switch(&h.socket, &switch_doc(&[g1(&h.name), g2(&h.name)]))?;
    }
    let t = Instant::now();
    lab.stop_manager();
    lab.start_manager()?;
    r.manager_restart_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let (v, missing) = time_until_visible(&lab, &g2, t, Duration::from_secs(o.refresh_timeout_s))?;
    r.after_restart = Dist::of(&v);
    r.after_restart_missing = missing;
    drop(lab);
    Ok(r)
}

pub fn print(o: &Options, r: &Report) {
    let row = |what: &str, d: &Dist| {
        println!(
            "{what:<44} {:>4} {:>10.1} {:>10.1} {:>10.1}",
            d.n, d.p50_ms, d.p99_ms, d.max_ms
        )
    };
    println!(
        "\ncluster: tandem-manager + {} tandemds (no VMs) on 127.0.0.1; agent heartbeat every {} s, inventory every {} s (and when the manager asks)",
        r.hosts, r.heartbeat_s, r.inventory_every_s
    );
    println!(
        "{:<44} {:>4} {:>10} {:>10} {:>10}",
        "", "n", "p50 ms", "p99 ms", "max ms"
    );
    row("token create (tandem token create)", &r.token_create);
    row("join (tandem host join → cert on disk)", &r.join);
    row("tandemd start → online with inventory", &r.first_report);
    row("switch change → visible (periodic inventory)", &r.refresh);
    row(
        "manager restart → changed inventory visible",
        &r.after_restart,
    );
    println!(
        "all {} tokens + joins, one after the other: {:.2} s; all {} hosts online with inventory {:.1} s after the first start",
        r.hosts, r.join_total_s, r.hosts, r.first_report_all_s
    );
    if r.refresh_missing + r.after_restart_missing > 0 {
        println!(
            "NOT VISIBLE within {} s: {} hosts (periodic), {} hosts (after restart)",
            o.refresh_timeout_s, r.refresh_missing, r.after_restart_missing
        );
    }
    println!(
        "manager restart (SIGTERM → answering again): {:.0} ms",
        r.manager_restart_ms
    );
    println!(
        "steady state over {:.1} s: manager CPU {:.0} ms = {:.2} % of a core, {:.0} µs per heartbeat ({} hosts / {} s); RSS {:.1} MiB (max {:.1}, HWM {:.1}); all tandemds {:.2} % of a core, {:.1} MiB RSS each",
        r.window_s,
        r.manager_cpu_ms,
        r.manager_cpu_pct,
        r.manager_cpu_us_per_heartbeat,
        r.hosts,
        r.heartbeat_s,
        r.manager_rss_kib as f64 / 1024.0,
        r.manager_rss_max_kib as f64 / 1024.0,
        r.manager_hwm_kib as f64 / 1024.0,
        r.hosts_cpu_pct,
        r.host_rss_avg_kib as f64 / 1024.0
    );
    println!("(visible: the first 250 ms poll of `tandem host list` (GET /v1/hosts) that shows it; the periodic row measures the agent's {} s inventory interval, not the manager)", r.inventory_every_s);
    println!(
        "reproduce: tandem bench cluster --hosts {} --window-s {} --refresh-timeout-s {}",
        o.hosts, o.window_s, o.refresh_timeout_s
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_document_adds_port_groups() {
        let d = switch_doc(&["bench-h000".into()]);
        assert!(d.contains("name = \"vms\"") && d.contains("name = \"bench-h000\""));
        assert!(d.contains("vlan = 100"));
    }

    #[test]
    fn port_groups_are_found_in_a_host_view() {
        let h = serde_json::json!({"inventory": {"port_groups": [{"name": "a"}, {"name": "b"}]}});
        assert!(has_port_group(&h, "b"));
        assert!(!has_port_group(&h, "c"));
        assert!(!has_port_group(&serde_json::json!({}), "a"));
    }

    #[test]
    fn this_process_has_cpu_time_and_rss() {
        let me = std::process::id();
        assert!(cpu_ms(me).is_some());
        assert!(status_kib(me, "VmRSS").unwrap() > 0);
    }
}
