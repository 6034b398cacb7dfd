//! `tandem bench deploy`: fan-out deployment (`tandem deploy`, see
//! docs/deploy.md) on a lab of N hosts, tandem's plan against
//! all-from-source and a naive binary tree, with the lower bound.
//!
//! Each topology gets a lab of its own, built and torn down here:
//!
//! ```text
//!   mgmt: tdepPIDXm (manager, m0 10.231.0.1/24) ══ tdepPIDXf br0 ══ mg0 of every host
//!         (host i: 10.231.0.(10+i)/24, its host API on :7444; management never shaped)
//!   mesh: every pair of hosts a veth (to-<peer>), 10.232.x.y/30 at each end;
//!         host i's data address 10.233.0.(i+1)/32 on lo, /32 routes to the
//!         others' over the direct veth only; each direction tbf-shaped to
//!         its own rate, drawn from the seeded generator in [R/4, R]
//!   rack: tdepPIDXt, a bridge (the ToR); host i's up0 on it with
//!         10.233.0.(i+1)/24, its egress (the host's uplink) tbf-shaped to
//!         R: every copy a host sends shares it
//! ```
//!
//! Host `s` (index 0) holds the template; `h1`…`h(N-1)` are the targets,
//! each getting `--per-host` copies (one over the network, the rest
//! local). Every tandemd serves its image directory on its data address
//! (`--image-listen 0.0.0.0:7450 --image-advertise <data>:7450`), so a
//! copy from A to B crosses exactly A's veth to B (mesh) or A's uplink
//! (rack), and the veths' `tx_bytes` say what was sent where.
//!
//! Strategies, all through `tandem deploy --links FILE` against the same
//! lab, one after the other in every run:
//!
//! - **tandem**: every direct link with its true time (image bytes × wire
//!   overhead / shaped rate), so the plan is exact;
//! - **all-from-source**: only the links source → target;
//! - **binary tree**: only parent → child, host i's parent (i-1)/2 (s = 0).
//!
//! On the rack every strategy runs with `--egress-slots 1` (one send at a
//! time per host: what one shaped uplink is) and every link's time is one
//! image at R.
//!
//! Lower bounds (store-and-forward: a host sends only a whole copy):
//! mesh, the largest shortest-path time from the source over the
//! independent links (Dijkstra); rack, ceil(log2 N) rounds of one image at
//! R (with one send at a time per host the holders at most double per
//! round). Local copies come on top of both.
//!
//! The slowed link (mesh): once the first transfer on the plan's busiest
//! link from the source is under way (its `network copy A -> B` line on
//! stderr), that link's tbf rate is cut to a fifth. Run once with every
//! link offered (the executor re-plans from progress and may re-route),
//! and once with only the plan's own links offered: re-planning cannot be
//! turned off, but with no other link there is no other route, so the
//! first plan's routes are executed as they are.
//!
//! Every namespace, process and directory made here is removed on every
//! exit path, SIGINT and SIGTERM included. Needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::Value;

use crate::topology::{delete_netns, spawn_in_ns};

const MANAGER_IP: &str = "10.231.0.1";
const MANAGER_PORT: u16 = 7443;
const HOST_API_PORT: u16 = 7444;
const IMAGE_PORT: u16 = 7450;
/// Wire bytes per image byte on a shaped veth: a full TCP segment carries
/// 1448 bytes in a 1514-byte frame (Ethernet + IPv4 + TCP with
/// timestamps), and TLS adds 22 bytes per 16 KiB record. tbf counts the
/// frames.
pub const WIRE_FACTOR: f64 = (1514.0 / 1448.0) * ((16384.0 + 22.0) / 16384.0);
const TEMPLATE: &str = "tmpl.img";
/// How much the slowed link slows down.
const SLOWDOWN: f64 = 5.0;

/// Which lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopoKind {
    Mesh,
    Rack,
}

impl TopoKind {
    pub fn name(self) -> &'static str {
        match self {
            TopoKind::Mesh => "mesh",
            TopoKind::Rack => "rack",
        }
    }
}

/// `--topology mesh|rack|both`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topologies {
    Mesh,
    Rack,
    Both,
}

impl Topologies {
    pub fn kinds(self) -> Vec<TopoKind> {
        match self {
            Topologies::Mesh => vec![TopoKind::Mesh],
            Topologies::Rack => vec![TopoKind::Rack],
            Topologies::Both => vec![TopoKind::Mesh, TopoKind::Rack],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Topologies::Mesh => "mesh",
            Topologies::Rack => "rack",
            Topologies::Both => "both",
        }
    }
}

impl std::str::FromStr for Topologies {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mesh" => Ok(Topologies::Mesh),
            "rack" => Ok(Topologies::Rack),
            "both" => Ok(Topologies::Both),
            _ => Err(format!("`{s}`: mesh, rack or both")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    Tandem,
    AllFromSource,
    BinaryTree,
}

const STRATEGIES: [Strategy; 3] = [
    Strategy::Tandem,
    Strategy::AllFromSource,
    Strategy::BinaryTree,
];

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Tandem => "tandem",
            Strategy::AllFromSource => "all-from-source",
            Strategy::BinaryTree => "binary tree",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Strategy::Tandem => "t",
            Strategy::AllFromSource => "a",
            Strategy::BinaryTree => "b",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Hosts in all, the source included.
    pub hosts: usize,
    pub image_mib: u64,
    pub runs: u32,
    pub topologies: Topologies,
    pub seed: u64,
    /// R: the rack's uplinks; the mesh's links are drawn in [R/4, R].
    pub rate_mbit: f64,
    /// Copies per target host (one over the network, the rest local).
    pub per_host: u32,
    pub tandem: PathBuf,
    pub tandemd: PathBuf,
    pub manager: PathBuf,
    /// The labs' directories (each host's image directory among them).
    pub work_dir: PathBuf,
}

impl Options {
    /// The command line that reproduces a run.
    pub fn reproduce(&self) -> String {
        let mut s = format!(
            "tandem bench deploy --hosts {} --image-mib {} --runs {} --topology {} --seed {} --rate-mbit {}",
            self.hosts,
            self.image_mib,
            self.runs,
            self.topologies.name(),
            self.seed,
            self.rate_mbit
        );
        if self.work_dir != Path::new("/tmp") {
            s.push_str(&format!(" --work-dir {}", self.work_dir.display()));
        }
        s
    }
}

/// One directed direct link: its shaped rate and one image's time on it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkSpec {
    pub from: String,
    pub to: String,
    pub mbit: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub hosts: usize,
    pub targets: usize,
    pub per_host: u32,
    pub image_bytes: u64,
    pub runs: u32,
    pub seed: u64,
    pub rate_mbit: f64,
    pub wire_factor: f64,
    /// `df -T` of the work directory: reflinks or byte copies.
    pub datastore_fs: String,
    pub cpus: usize,
    pub loadavg_at_start: String,
    pub topologies: Vec<TopoReport>,
    pub slowed: Option<SlowedReport>,
    pub reproduce: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopoReport {
    pub topology: TopoKind,
    pub lower_bound_s: f64,
    pub lower_bound: String,
    pub links: Vec<LinkSpec>,
    pub strategies: Vec<StrategyReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StrategyReport {
    pub strategy: String,
    pub links_offered: usize,
    pub egress_slots: Option<u32>,
    /// The first plan's makespan (the dry run's `plan.makespan`), seconds.
    pub predicted_s: f64,
    /// The first plan's network copies, `from -> to`.
    pub planned_copies: Vec<String>,
    pub runs: Vec<RunReport>,
    pub makespan_p50_s: Option<f64>,
    pub makespan_p99_s: Option<f64>,
    /// Median of each run's elapsed / its own plan's makespan.
    pub actual_over_predicted_p50: Option<f64>,
    pub over_lower_bound_p50: Option<f64>,
    /// All-from-source's median makespan / this one's.
    pub speedup_vs_all_from_source: Option<f64>,
    /// Bytes the source's links sent / image bytes (veth tx counters count
    /// GSO packets: TLS framing and headers add about 0.3 %).
    pub source_sent_images_p50: Option<f64>,
    pub local_copy_p50_ms: Option<f64>,
    pub local_copy_methods: Vec<String>,
    /// Median over done network copies of copy time / link time planned.
    pub transfer_over_link_p50: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct RunReport {
    pub run: u32,
    pub prefix: String,
    /// The view's `state`, or `error`.
    pub state: String,
    /// The view's `elapsed_s`.
    pub elapsed_s: Option<f64>,
    /// This deployment's plan's makespan, from the plan it printed.
    pub predicted_s: Option<f64>,
    /// The CLI's own wall time.
    pub wall_s: f64,
    pub source_tx_bytes: u64,
    pub source_sent_images: f64,
    /// The network copies made (`from -> to`, state).
    pub transfers: Vec<String>,
    pub cancelled: usize,
    pub local_copies_ms: Vec<f64>,
    pub local_methods: Vec<String>,
    /// Bytes on links that the deployment's transfers do not account for.
    pub anomalies: Vec<String>,
    /// Each done transfer's own time / its link's time as planned.
    pub transfer_over_link_time: Vec<f64>,
    /// The log's lines about failures, cancels and links taken out.
    pub notes: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlowedReport {
    pub from: String,
    pub to: String,
    pub mbit_before: f64,
    pub mbit_after: f64,
    /// The first plan's makespan (before the slowdown).
    pub predicted_s: f64,
    /// The first plan's network copies, `from -> to`.
    pub planned_copies: Vec<String>,
    /// The mesh's lower bound had the slow rate been known from the start.
    pub lower_bound_slow_s: f64,
    pub with_replanning: SlowedRun,
    pub plan_links_only: SlowedRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlowedRun {
    pub links_offered: usize,
    pub run: RunReport,
    /// When the rate was cut, seconds after `tandem deploy` started.
    pub slowed_at_s: Option<f64>,
    /// Wire images the slowed link carried.
    pub slowed_link_images: f64,
    /// How the slowed link's target got its network copy.
    pub target_via: String,
    /// Log lines about cancels, failures and routes.
    pub events: Vec<String>,
}

// ------------------------------------------------------------ interrupts

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM end the run through the error path, so that the lab's
/// `Drop` stops every process and removes every namespace and directory.
fn install_signal_handlers() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        let _ = unsafe { signal(sig, SigHandler::Handler(on_signal)) };
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    check_interrupted()
}

fn wait_for<T>(
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

// ------------------------------------------------------------ helpers

/// Runs a command to completion within 60 s; its stdout, or an error with
/// its stderr.
fn run_ok(argv: &[&str], dir: &Path) -> anyhow::Result<String> {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    let out = crate::bounded::run_bounded(cmd, dir, Duration::from_secs(60), &interrupted)?;
    if !out.status.success() {
        bail!("{}: {}", argv.join(" "), out.text());
    }
    Ok(out.stdout)
}

/// `ip netns exec NS ARGV…`.
fn ns_ok(ns: &str, argv: &[&str], dir: &Path) -> anyhow::Result<String> {
    let mut a = vec!["ip", "netns", "exec", ns];
    a.extend_from_slice(argv);
    run_ok(&a, dir)
}

/// A child of this bench: SIGTERM, up to `grace`, then SIGKILL.
fn stop_child(c: &mut Child, grace: Duration) {
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

fn pct(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    Some(crate::stats_ms(&mut v, p))
}

/// Shortest times from host 0 over `links` (`time[a][b]`, `None`: no
/// link): Dijkstra.
fn shortest_from_source(time: &[Vec<Option<f64>>]) -> Vec<f64> {
    let n = time.len();
    let mut dist = vec![f64::INFINITY; n];
    let mut done = vec![false; n];
    dist[0] = 0.0;
    for _ in 0..n {
        let Some(u) = (0..n)
            .filter(|&i| !done[i] && dist[i].is_finite())
            .min_by(|&a, &b| dist[a].total_cmp(&dist[b]))
        else {
            break;
        };
        done[u] = true;
        for v in 0..n {
            if let Some(t) = time[u][v] {
                if dist[u] + t < dist[v] {
                    dist[v] = dist[u] + t;
                }
            }
        }
    }
    dist
}

/// `ceil(log2(n))` for n ≥ 1.
fn rounds(n: usize) -> u32 {
    let mut r = 0;
    while (1usize << r) < n {
        r += 1;
    }
    r
}

fn host_name(i: usize) -> String {
    if i == 0 {
        "s".to_string()
    } else {
        format!("h{i}")
    }
}

/// `(Copy|Reflink, N ms)` of a log line `HOST: FILE ready (Copy, N ms)`.
fn local_copy_of(line: &str) -> Option<(String, f64)> {
    let rest = &line[line.find(" ready (")? + " ready (".len()..];
    let (method, rest) = rest.split_once(", ")?;
    let ms = rest.strip_suffix(" ms)")?.trim().parse().ok()?;
    Some((method.to_string(), ms))
}

/// The plan's makespan from the plan text `tandem deploy` prints.
fn makespan_in(text: &str) -> Option<f64> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("makespan ")?.trim().parse().ok())
}

/// The network copies of a plan (`view.plan.steps`), as (from, to).
fn plan_copies(view: &Value) -> Vec<(String, String, f64)> {
    view["plan"]["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter(|s| s["action"]["action"] == "network-copy")
                .filter_map(|s| {
                    Some((
                        s["action"]["from"].as_str()?.to_string(),
                        s["action"]["to"].as_str()?.to_string(),
                        s["start"].as_f64().unwrap_or(0.0),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The text a `tandem` command printed, for an error.
fn brief(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

// ------------------------------------------------------------ the lab

/// A finished `tandem deploy`.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    wall_s: f64,
}

struct LabHost {
    name: String,
    ns: String,
    mgmt_ip: String,
    data_ip: String,
    state: PathBuf,
    socket: PathBuf,
    images: PathBuf,
    ram: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// One topology's namespaces, manager and tandemds; all stopped and
/// removed on drop.
struct Lab {
    kind: TopoKind,
    dir: PathBuf,
    tandem: PathBuf,
    /// Every namespace made, in order.
    made: Vec<String>,
    mgr: String,
    manager: Option<Child>,
    hosts: Vec<LabHost>,
    /// Directed links as shaped: (from, to) → Mbit/s.
    rates: BTreeMap<(usize, usize), f64>,
    image_bytes: u64,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            if let Some(c) = &h.child {
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
            stop_child(&mut m, Duration::from_secs(10));
        }
        // Deleting a namespace kills what is left in it and removes its
        // veths, bridges and qdiscs.
        for ns in self.made.drain(..).rev() {
            delete_netns(&ns);
        }
        for h in &self.hosts {
            let _ = std::fs::remove_dir_all(&h.ram);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    fn ns(&mut self, name: String) -> anyhow::Result<String> {
        run_ok(&["ip", "netns", "add", &name], &self.dir)?;
        self.made.push(name.clone());
        run_ok(&["ip", "-n", &name, "link", "set", "lo", "up"], &self.dir)?;
        Ok(name)
    }

    /// `ip ARGS`, split at spaces (no argument here has one).
    fn ip(&self, args: &str) -> anyhow::Result<()> {
        let mut a = vec!["ip"];
        a.extend(args.split_whitespace());
        run_ok(&a, &self.dir).map(|_| ())
    }

    fn addr() -> String {
        format!("{MANAGER_IP}:{MANAGER_PORT}")
    }

    fn operator(&self) -> PathBuf {
        self.dir.join("manager/operator")
    }

    /// `tandem ARGS` as the cluster's operator, in the manager's namespace.
    fn op_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.mgr])
            .arg(&self.tandem)
            .args(args)
            .arg("--identity")
            .arg(self.operator())
            .args(["--manager", &Self::addr()])
            .env_remove("TANDEM_MANAGER")
            .env_remove("TANDEM_IDENTITY");
        cmd
    }

    fn op(&self, args: &[&str], timeout: Duration) -> anyhow::Result<crate::bounded::CmdOut> {
        crate::bounded::run_bounded(self.op_cmd(args), &self.dir, timeout, &interrupted)
    }

    fn op_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.op(&a, Duration::from_secs(30))?;
        if !out.status.success() {
            bail!("tandem {}: {}", args.join(" "), out.text());
        }
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("tandem {}: {}", args.join(" "), out.stdout))
    }

    fn manager_log(&self) -> String {
        crate::tail(&self.dir.join("manager.log"), 30)
    }

    /// Builds the lab: namespaces, management fabric, data network
    /// (shaped), manager, hosts joined and serving images.
    fn build(o: &Options, kind: TopoKind, say: &mut dyn FnMut(&str)) -> anyhow::Result<Lab> {
        let pid = std::process::id();
        let k = &kind.name()[..1];
        let dir = o.work_dir.join(format!("tdeploy-{pid}-{}", kind.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut lab = Lab {
            kind,
            dir,
            tandem: o.tandem.clone(),
            made: Vec::new(),
            mgr: String::new(),
            manager: None,
            hosts: Vec::new(),
            rates: BTreeMap::new(),
            image_bytes: o.image_mib << 20,
        };
        say(&format!(
            "{}: {} namespaces, management fabric",
            kind.name(),
            o.hosts + 2 + usize::from(kind == TopoKind::Rack)
        ));
        let fab = lab.ns(format!("tdep{pid}{k}f"))?;
        lab.mgr = lab.ns(format!("tdep{pid}{k}m"))?;
        let mgr = lab.mgr.clone();
        lab.ip(&format!("-n {fab} link add br0 type bridge"))?;
        lab.ip(&format!("-n {fab} link set br0 up"))?;
        lab.ip(&format!(
            "-n {mgr} link add m0 type veth peer name fm netns {fab}"
        ))?;
        lab.ip(&format!("-n {fab} link set fm master br0 up"))?;
        lab.ip(&format!("-n {mgr} addr add {MANAGER_IP}/24 dev m0"))?;
        lab.ip(&format!("-n {mgr} link set m0 up"))?;
        for i in 0..o.hosts {
            check_interrupted()?;
            let ns = lab.ns(format!("tdep{pid}{k}h{i}"))?;
            lab.ip(&format!(
                "-n {ns} link add mg0 type veth peer name f{i} netns {fab}"
            ))?;
            lab.ip(&format!("-n {fab} link set f{i} master br0 up"))?;
            let mgmt_ip = format!("10.231.0.{}", 10 + i);
            lab.ip(&format!("-n {ns} addr add {mgmt_ip}/24 dev mg0"))?;
            lab.ip(&format!("-n {ns} link set mg0 up"))?;
            let name = host_name(i);
            let hdir = lab.dir.join(&name);
            let images = hdir.join("images");
            std::fs::create_dir_all(&images)?;
            lab.hosts.push(LabHost {
                name,
                ns,
                mgmt_ip,
                data_ip: format!("10.233.0.{}", i + 1),
                state: hdir.join("state"),
                socket: hdir.join("tandemd.sock"),
                images,
                ram: PathBuf::from(format!("/dev/shm/tdeploy-{pid}-{k}{i}")),
                log: hdir.join("tandemd.log"),
                child: None,
            });
        }
        match kind {
            TopoKind::Mesh => {
                say(&format!(
                    "mesh: {} veth pairs, each direction shaped",
                    o.hosts * (o.hosts - 1) / 2
                ));
                lab.build_mesh(o)?;
            }
            TopoKind::Rack => {
                say(&format!(
                    "rack: a ToR bridge, {} uplinks shaped to {} Mbit/s",
                    o.hosts, o.rate_mbit
                ));
                let tor = lab.ns(format!("tdep{pid}{k}t"))?;
                lab.build_rack(o, &tor)?;
            }
        }
        say("manager: cluster init, tandem-manager");
        lab.start_manager(&o.manager)?;
        say(&format!(
            "joining {} hosts and starting their tandemds",
            o.hosts
        ));
        for i in 0..o.hosts {
            check_interrupted()?;
            lab.join_and_start(i, &o.tandemd)?;
        }
        lab.wait_online()?;
        lab.check_data_paths()?;
        Ok(lab)
    }

    fn tbf(&self, ns: &str, dev: &str, mbit: f64, verb: &str) -> anyhow::Result<()> {
        let kbit = (mbit * 1000.0).round().max(8.0) as u64;
        // The same bucket at every rate, larger than any GSO packet: tbf
        // keeps the packets it holds when its rate changes, and one larger
        // than a new, smaller bucket would never leave (the stream stalls).
        let burst = 256 << 10;
        let cmd = format!(
            "tc qdisc {verb} dev {dev} root tbf rate {kbit}kbit burst {burst} latency 100ms"
        );
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        ns_ok(ns, &argv, &self.dir).map(|_| ())
    }

    fn build_mesh(&mut self, o: &Options) -> anyhow::Result<()> {
        let n = self.hosts.len();
        for h in &self.hosts {
            self.ip(&format!("-n {} addr add {}/32 dev lo", h.ns, h.data_ip))?;
        }
        let mut pair = 0usize;
        for a in 0..n {
            for b in a + 1..n {
                check_interrupted()?;
                let (ha, hb) = (&self.hosts[a], &self.hosts[b]);
                self.ip(&format!(
                    "-n {} link add to-{} type veth peer name to-{} netns {}",
                    ha.ns, hb.name, ha.name, hb.ns
                ))?;
                // A /30 per pair: .1 at a, .2 at b.
                let net = |end: usize| format!("10.232.{}.{}", pair / 64, (pair % 64) * 4 + end);
                for (h, peer, me, them) in [(ha, hb, 1, 2), (hb, ha, 2, 1)] {
                    let (ns, dev) = (&h.ns, format!("to-{}", peer.name));
                    self.ip(&format!("-n {ns} addr add {}/30 dev {dev}", net(me)))?;
                    self.ip(&format!("-n {ns} link set {dev} up"))?;
                    self.ip(&format!(
                        "-n {ns} route add {}/32 via {} dev {dev} src {}",
                        peer.data_ip,
                        net(them),
                        h.data_ip
                    ))?;
                }
                pair += 1;
            }
        }
        // Unequal rates, one per direction, from the seed: [R/4, R].
        let mut rng = crate::Rng(o.seed);
        for a in 0..n {
            for b in 0..n {
                if a == b {
                    continue;
                }
                let u = rng.below(1_000_001) as f64 / 1e6;
                let mbit = ((o.rate_mbit / 4.0 + u * o.rate_mbit * 0.75) * 10.0).round() / 10.0;
                let dev = format!("to-{}", self.hosts[b].name);
                self.tbf(&self.hosts[a].ns, &dev, mbit, "add")?;
                self.rates.insert((a, b), mbit);
            }
        }
        Ok(())
    }

    fn build_rack(&mut self, o: &Options, tor: &str) -> anyhow::Result<()> {
        self.ip(&format!("-n {tor} link add br0 type bridge"))?;
        self.ip(&format!("-n {tor} link set br0 up"))?;
        for (i, h) in self.hosts.iter().enumerate() {
            check_interrupted()?;
            let ns = &h.ns;
            self.ip(&format!(
                "-n {ns} link add up0 type veth peer name p{i} netns {tor}"
            ))?;
            self.ip(&format!("-n {tor} link set p{i} master br0 up"))?;
            self.ip(&format!("-n {ns} addr add {}/24 dev up0", h.data_ip))?;
            self.ip(&format!("-n {ns} link set up0 up"))?;
            // The host's uplink: every copy it sends shares it.
            self.tbf(ns, "up0", o.rate_mbit, "add")?;
        }
        let n = self.hosts.len();
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    self.rates.insert((a, b), o.rate_mbit);
                }
            }
        }
        Ok(())
    }

    fn start_manager(&mut self, bin: &Path) -> anyhow::Result<()> {
        let state = self.dir.join("manager");
        let addr = Self::addr();
        let mut init = Command::new(&self.tandem);
        init.args(["cluster", "init", "--name", "deploybench", "--state-dir"])
            .arg(&state)
            .args(["--listen", &addr, "--advertise", &addr]);
        let out =
            crate::bounded::run_bounded(init, &self.dir, Duration::from_secs(60), &interrupted)?;
        if !out.status.success() {
            bail!("tandem cluster init: {}", out.text());
        }
        let log = std::fs::File::create(self.dir.join("manager.log"))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.mgr])
            .arg(bin)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting tandem-manager")?;
        let ready = wait_for(
            "tandem-manager answering",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                if let Ok(Some(st)) = child.try_wait() {
                    return Some(Err(anyhow!("tandem-manager exited ({st})")));
                }
                let out = self
                    .op(&["cluster", "status"], Duration::from_secs(10))
                    .ok()?;
                out.status.success().then_some(Ok(()))
            },
        );
        // Kept (and so stopped on drop) whether or not it answered.
        self.manager = Some(child);
        ready
            .and_then(|r| r)
            .with_context(|| format!("manager log:\n{}", self.manager_log()))
    }

    /// A token, `tandem host join` from the host's namespace, and its
    /// tandemd with the identity, the host API and the image service.
    fn join_and_start(&mut self, i: usize, tandemd: &Path) -> anyhow::Result<()> {
        let name = self.hosts[i].name.clone();
        let token = self.op_json(&["token", "create", "--host", &name])?["token"]
            .as_str()
            .ok_or_else(|| anyhow!("`token create` printed no token"))?
            .to_string();
        let h = &self.hosts[i];
        std::fs::create_dir_all(&h.state)?;
        let mut join = Command::new("ip");
        join.args(["netns", "exec", &h.ns])
            .arg(&self.tandem)
            .args(["host", "join", &Self::addr(), "--token", &token])
            .args(["--name", &name, "--timeout", "20s", "--state-dir"])
            .arg(&h.state);
        let out =
            crate::bounded::run_bounded(join, &self.dir, Duration::from_secs(40), &interrupted)?;
        if !out.status.success() {
            bail!("{name}: tandem host join: {}", out.text());
        }
        let switch = h.state.join("bench-switch.toml");
        std::fs::write(&switch, "[[port_group]]\nname = \"vms\"\nvlan = 10\n")?;
        let log = std::fs::File::create(&h.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .arg(tandemd)
            .arg("--state-dir")
            .arg(&h.state)
            .arg("--socket")
            .arg(&h.socket)
            .arg("--ram-dir")
            .arg(&h.ram)
            .arg("--image-dir")
            .arg(&h.images)
            .arg("--switch-config")
            .arg(&switch)
            .args(["--host-api", &format!("0.0.0.0:{HOST_API_PORT}")])
            .args([
                "--host-api-advertise",
                &format!("{}:{HOST_API_PORT}", h.mgmt_ip),
            ])
            .args(["--image-listen", &format!("0.0.0.0:{IMAGE_PORT}")])
            .args(["--image-advertise", &format!("{}:{IMAGE_PORT}", h.data_ip)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting tandemd")?;
        self.hosts[i].child = Some(child);
        let h = &mut self.hosts[i];
        let (socket, logp) = (h.socket.clone(), h.log.clone());
        wait_for(
            &format!("tandemd {name} listening"),
            Duration::from_secs(30),
            Duration::from_millis(25),
            || {
                if let Some(Ok(Some(st))) = h.child.as_mut().map(|c| c.try_wait()) {
                    return Some(Err(anyhow!(
                        "tandemd {name} exited ({st}): {}",
                        crate::tail(&logp, 10)
                    )));
                }
                std::os::unix::net::UnixStream::connect(&socket)
                    .ok()
                    .map(|_| Ok(()))
            },
        )?
    }

    /// Every host online at the manager with its host API and image service.
    fn wait_online(&self) -> anyhow::Result<()> {
        let mut last = Value::Null;
        wait_for(
            "every host online with its host API and image service",
            Duration::from_secs(60),
            Duration::from_millis(250),
            || {
                let v = self.op_json(&["host", "list"]).ok()?;
                let list = v.as_array()?.clone();
                last = v;
                self.hosts
                    .iter()
                    .all(|h| {
                        list.iter().any(|x| {
                            x["name"] == h.name.as_str()
                                && x["connection"] == "online"
                                && x["host_api"] == format!("{}:{HOST_API_PORT}", h.mgmt_ip)
                                && x.to_string()
                                    .contains(&format!("\"{}:{IMAGE_PORT}\"", h.data_ip))
                        })
                    })
                    .then_some(())
            },
        )
        .with_context(|| {
            format!(
                "last `host list`: {last}\nmanager log:\n{}",
                self.manager_log()
            )
        })
    }

    /// Every host reaches every other's image service on its data address
    /// (mesh: over the direct veth).
    fn check_data_paths(&self) -> anyhow::Result<()> {
        for a in &self.hosts {
            for b in self.hosts.iter().filter(|b| b.name != a.name) {
                check_interrupted()?;
                if self.kind == TopoKind::Mesh {
                    let route = ns_ok(&a.ns, &["ip", "route", "get", &b.data_ip], &self.dir)?;
                    if !route.contains(&format!("dev to-{} ", b.name)) {
                        bail!("{} -> {}: routed {route}", a.name, b.name);
                    }
                }
                let addr: std::net::SocketAddr = format!("{}:{IMAGE_PORT}", b.data_ip).parse()?;
                let ok = spawn_in_ns(&a.ns, move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok()
                })?
                .join()
                .map_err(|_| anyhow!("connect thread panicked"))??;
                if !ok {
                    bail!(
                        "{} does not reach {}'s image service at {addr}",
                        a.name,
                        b.name
                    );
                }
            }
        }
        Ok(())
    }

    /// The template: incompressible bytes from the seed.
    fn write_template(&self, seed: u64) -> anyhow::Result<()> {
        use std::io::Write;
        let mut rng = crate::Rng(seed ^ 0x5eed_7e47);
        let mut f = std::fs::File::create(self.hosts[0].images.join(TEMPLATE))?;
        let mut left = self.image_bytes;
        let mut buf = vec![0u8; 4 << 20];
        while left > 0 {
            check_interrupted()?;
            for c in buf.chunks_mut(8) {
                let x = rng.next().to_le_bytes();
                c.copy_from_slice(&x[..c.len()]);
            }
            let k = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..k])?;
            left -= k as u64;
        }
        f.sync_all()?;
        Ok(())
    }

    /// Removes a run's clones (and any partial file) from every host.
    fn clear_copies(&self, prefix: &str) {
        let start = format!("{prefix}-");
        for h in &self.hosts {
            let Ok(dir) = std::fs::read_dir(&h.images) else {
                continue;
            };
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&start) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// tx bytes of every data device: (host index, device) → bytes.
    fn counters(&self) -> anyhow::Result<BTreeMap<(usize, String), u64>> {
        let mut m = BTreeMap::new();
        for (i, h) in self.hosts.iter().enumerate() {
            let out = run_ok(&["ip", "-n", &h.ns, "-j", "-s", "link", "show"], &self.dir)?;
            let v: Value = serde_json::from_str(&out).context("ip -j -s link")?;
            for l in v.as_array().into_iter().flatten() {
                let Some(dev) = l["ifname"].as_str() else {
                    continue;
                };
                if dev.starts_with("to-") || dev == "up0" {
                    let b = l["stats64"]["tx"]["bytes"].as_u64().unwrap_or(0);
                    m.insert((i, dev.to_string()), b);
                }
            }
        }
        Ok(m)
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    /// One image's time on link a → b as shaped, seconds.
    fn true_time(&self, a: usize, b: usize) -> f64 {
        self.image_bytes as f64 * WIRE_FACTOR * 8.0 / (self.rates[&(a, b)] * 1e6)
    }

    fn links_file(&self, name: &str, links: &[(usize, usize, f64)]) -> anyhow::Result<PathBuf> {
        let mut doc = String::new();
        for &(a, b, s) in links {
            doc.push_str(&format!(
                "[[link]]\nfrom = \"{}\"\nto = \"{}\"\nseconds = {s:.6}\n\n",
                self.hosts[a].name, self.hosts[b].name
            ));
        }
        let path = self.dir.join(name);
        std::fs::write(&path, doc)?;
        Ok(path)
    }

    fn deploy_args(&self, links: &Path, prefix: &str, per_host: u32, dry_run: bool) -> Vec<String> {
        let targets: Vec<&str> = self.hosts[1..].iter().map(|h| h.name.as_str()).collect();
        let mut a: Vec<String> = [
            "--json",
            "deploy",
            TEMPLATE,
            "--from",
            &self.hosts[0].name,
            "--hosts",
            &targets.join(","),
            "--per-host",
            &per_host.to_string(),
            "--links",
            &links.to_string_lossy(),
            "--name-prefix",
            prefix,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.kind == TopoKind::Rack {
            a.extend(["--egress-slots".to_string(), "1".to_string()]);
        }
        if dry_run {
            a.push("--dry-run".into());
        }
        a
    }

    /// The first plan of a deployment (a dry run): its view.
    fn dry_run(&self, links: &Path, per_host: u32) -> anyhow::Result<Value> {
        let args = self.deploy_args(links, "plan", per_host, true);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.op(&args, Duration::from_secs(300))?;
        if !out.status.success() {
            bail!(
                "tandem deploy --dry-run: {}\nmanager log:\n{}",
                out.text(),
                self.manager_log()
            );
        }
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("the dry run printed no view: {}", out.stdout))
    }

    /// Reads one deployment's outcome: the view (if any), the counters'
    /// deltas, the log's local copies; checks the bytes against its
    /// transfers.
    fn outcome(
        &self,
        run: u32,
        prefix: &str,
        ran: &Ran,
        before: &BTreeMap<(usize, String), u64>,
        after: &BTreeMap<(usize, String), u64>,
    ) -> RunReport {
        let Ran {
            status,
            stdout,
            stderr,
            wall_s,
        } = ran;
        let mut r = RunReport {
            run,
            prefix: prefix.to_string(),
            wall_s: *wall_s,
            predicted_s: makespan_in(stderr),
            ..RunReport::default()
        };
        let delta = |k: &(usize, String)| {
            after
                .get(k)
                .unwrap_or(&0)
                .saturating_sub(*before.get(k).unwrap_or(&0))
        };
        let image = self.image_bytes as f64;
        r.source_tx_bytes = after.keys().filter(|(i, _)| *i == 0).map(&delta).sum();
        r.source_sent_images = r.source_tx_bytes as f64 / image;
        let view: Option<Value> = serde_json::from_str(stdout).ok();
        let Some(view) = view else {
            r.state = "error".into();
            r.error = Some(format!("no view ({status}); stderr:\n{}", brief(stderr)));
            return r;
        };
        r.state = view["state"].as_str().unwrap_or("?").to_string();
        r.elapsed_s = view["elapsed_s"].as_f64();
        if r.state != "done" {
            r.error = Some(
                view["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("state {}", r.state)),
            );
        }
        // What the transfers account for, per sending device.
        let mut expected: BTreeMap<(usize, String), f64> = BTreeMap::new();
        let mut all_done: BTreeMap<(usize, String), bool> = BTreeMap::new();
        for t in view["transfers"].as_array().into_iter().flatten() {
            let (Some(from), Some(to)) = (t["from"].as_str(), t["to"].as_str()) else {
                continue;
            };
            let state = t["state"].as_str().unwrap_or("?");
            r.transfers.push(format!("{from} -> {to} ({state})"));
            if state == "cancelled" {
                r.cancelled += 1;
            }
            if state == "done" {
                let planned = view["links"].as_array().and_then(|l| {
                    l.iter().find(|l| l["from"] == from && l["to"] == to)?["seconds"].as_f64()
                });
                if let (Some(p), Some(took)) = (planned, t["seconds"].as_f64()) {
                    r.transfer_over_link_time.push(took / p);
                }
            }
            let (Some(a), Some(_)) = (self.index(from), self.index(to)) else {
                continue;
            };
            let dev = match self.kind {
                TopoKind::Mesh => format!("to-{to}"),
                TopoKind::Rack => "up0".to_string(),
            };
            *expected.entry((a, dev.clone())).or_default() +=
                t["bytes_done"].as_f64().unwrap_or(0.0);
            let e = all_done.entry((a, dev)).or_insert(true);
            *e &= state == "done";
        }
        for k in after.keys() {
            let sent = delta(k) as f64 / image;
            let want = expected.get(k).copied().unwrap_or(0.0) / image;
            let dev_to = |(i, dev): &(usize, String)| match self.kind {
                TopoKind::Mesh => format!(
                    "{} -> {}",
                    self.hosts[*i].name,
                    dev.trim_start_matches("to-")
                ),
                TopoKind::Rack => format!("{}'s uplink", self.hosts[*i].name),
            };
            let suspicious = match all_done.get(k) {
                // No transfer here: only acknowledgements may pass.
                None => sent > 0.1,
                Some(true) => (sent - want).abs() > 0.1,
                // A cancelled or failed transfer's last count is a poll old.
                Some(false) => sent + 0.1 < want || sent > want + 0.5,
            };
            if suspicious {
                r.anomalies.push(format!(
                    "{} carried {sent:.3} images, its transfers account for {want:.3}",
                    dev_to(k)
                ));
            }
        }
        for l in view["log"].as_array().into_iter().flatten() {
            let Some(l) = l.as_str() else {
                continue;
            };
            if [
                "failed",
                "cancelled",
                "taken out",
                "does not answer",
                "removed",
            ]
            .iter()
            .any(|w| l.contains(w))
            {
                r.notes.push(l.to_string());
            }
            if let Some((method, ms)) = local_copy_of(l) {
                r.local_copies_ms.push(ms);
                if !r.local_methods.contains(&method) {
                    r.local_methods.push(method);
                }
            }
        }
        r
    }

    /// One deployment, bounded by `timeout`.
    fn deploy(
        &self,
        run: u32,
        links: &Path,
        prefix: &str,
        per_host: u32,
        timeout: Duration,
    ) -> anyhow::Result<RunReport> {
        self.clear_copies(prefix);
        let before = self.counters()?;
        let args = self.deploy_args(links, prefix, per_host, false);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Instant::now();
        let out = self.op(&args, timeout);
        let wall = t.elapsed().as_secs_f64();
        check_interrupted()?;
        let after = self.counters()?;
        let r = match out {
            Ok(out) => self.outcome(
                run,
                prefix,
                &Ran {
                    status: out.status,
                    stdout: out.stdout,
                    stderr: out.stderr,
                    wall_s: wall,
                },
                &before,
                &after,
            ),
            Err(e) => RunReport {
                run,
                prefix: prefix.to_string(),
                state: "error".into(),
                wall_s: wall,
                error: Some(format!("{e:#}")),
                ..RunReport::default()
            },
        };
        self.clear_copies(prefix);
        Ok(r)
    }
}

// ------------------------------------------------------------ live deploy

/// `tandem deploy` running, its stderr lines read as they come; killed on
/// drop.
struct Live {
    child: Child,
    lines: Receiver<String>,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    seen: Vec<String>,
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Live {
    fn start(mut cmd: Command) -> anyhow::Result<Live> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tandem deploy")?;
        let mut out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        let stdout = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Live {
            child,
            lines,
            stdout: Some(stdout),
            seen: Vec::new(),
        })
    }

    /// Waits for a stderr line containing `words`, bounded.
    fn wait_line(&mut self, words: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            if Instant::now() >= deadline {
                bail!("no line with {words:?} within {timeout:?}");
            }
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(words) {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("tandem deploy ended before a line with {words:?}")
                }
            }
        }
    }

    /// Waits for the command to end, bounded: status, stdout, stderr.
    fn finish(mut self, timeout: Duration) -> anyhow::Result<(ExitStatus, String, String)> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            check_interrupted()?;
            if Instant::now() >= deadline {
                bail!("tandem deploy not done within {timeout:?}");
            }
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        Ok((
            status,
            String::from_utf8_lossy(&out).into_owned(),
            self.seen.join("\n"),
        ))
    }
}

// ------------------------------------------------------------ the bench

pub fn run(o: &Options, mut say: impl FnMut(&str)) -> anyhow::Result<Report> {
    if !(2..=32).contains(&o.hosts) {
        bail!("--hosts: 2 to 32 (the source included)");
    }
    if o.image_mib == 0 || o.image_mib > 64 << 10 {
        bail!("--image-mib: 1 to 65536");
    }
    if o.runs == 0 {
        bail!("--runs: at least 1");
    }
    if !(o.rate_mbit.is_finite() && o.rate_mbit >= 1.0) {
        bail!("--rate-mbit: at least 1");
    }
    for (what, p) in [
        ("tandem", &o.tandem),
        ("tandemd", &o.tandemd),
        ("tandem-manager", &o.manager),
    ] {
        if !p.is_file() {
            bail!("{what} not found at {}", p.display());
        }
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("tandem bench deploy needs root (namespaces, tc)");
    }
    install_signal_handlers();
    let datastore_fs = run_ok(
        &["df", "--output=fstype", &o.work_dir.to_string_lossy()],
        &o.work_dir,
    )
    .ok()
    .and_then(|s| s.lines().nth(1).map(|l| l.trim().to_string()))
    .unwrap_or_else(|| "?".into());
    let mut report = Report {
        hosts: o.hosts,
        targets: o.hosts - 1,
        per_host: o.per_host,
        image_bytes: o.image_mib << 20,
        runs: o.runs,
        seed: o.seed,
        rate_mbit: o.rate_mbit,
        wire_factor: WIRE_FACTOR,
        datastore_fs,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        loadavg_at_start: std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        topologies: Vec::new(),
        slowed: None,
        reproduce: o.reproduce(),
    };
    for kind in o.topologies.kinds() {
        let lab = Lab::build(o, kind, &mut say)?;
        say(&format!(
            "{}: writing the {} MiB template",
            kind.name(),
            o.image_mib
        ));
        lab.write_template(o.seed)?;
        let (t, slowed) = bench_topology(&lab, o, &mut say)?;
        report.topologies.push(t);
        if slowed.is_some() {
            report.slowed = slowed;
        }
        say(&format!("{}: tearing the lab down", kind.name()));
        drop(lab);
    }
    Ok(report)
}

fn bench_topology(
    lab: &Lab,
    o: &Options,
    say: &mut dyn FnMut(&str),
) -> anyhow::Result<(TopoReport, Option<SlowedReport>)> {
    let n = o.hosts;
    let kind = lab.kind;
    let image = lab.image_bytes as f64;
    // The links each strategy is offered, with their true times.
    let all: Vec<(usize, usize, f64)> = (0..n)
        .flat_map(|a| (1..n).filter(move |&b| b != a).map(move |b| (a, b)))
        .map(|(a, b)| (a, b, lab.true_time(a, b)))
        .collect();
    let offered = |s: Strategy| -> Vec<(usize, usize, f64)> {
        all.iter()
            .copied()
            .filter(|&(a, b, _)| match s {
                Strategy::Tandem => true,
                Strategy::AllFromSource => a == 0,
                Strategy::BinaryTree => a == (b - 1) / 2,
            })
            .collect()
    };
    let (lower_bound_s, lower_bound) = match kind {
        TopoKind::Mesh => {
            let mut time = vec![vec![None; n]; n];
            for &(a, b, t) in &all {
                time[a][b] = Some(t);
            }
            let d = shortest_from_source(&time);
            (
                d.iter().copied().fold(0.0, f64::max),
                "largest shortest-path time from the source over the independent links \
                 (store-and-forward, Dijkstra on image × wire factor / shaped rate)"
                    .to_string(),
            )
        }
        TopoKind::Rack => {
            let t = image * WIRE_FACTOR * 8.0 / (o.rate_mbit * 1e6);
            (
                f64::from(rounds(n)) * t,
                format!(
                    "ceil(log2 {n}) = {} rounds × one image at R ({t:.2} s): store-and-forward, one send at a time per host",
                    rounds(n)
                ),
            )
        }
    };
    let links: Vec<LinkSpec> = all
        .iter()
        .map(|&(a, b, t)| LinkSpec {
            from: lab.hosts[a].name.clone(),
            to: lab.hosts[b].name.clone(),
            mbit: lab.rates[&(a, b)],
            seconds: t,
        })
        .collect();
    let mut reports = Vec::new();
    let mut files = Vec::new();
    let mut tandem_plan = Value::Null;
    for s in STRATEGIES {
        check_interrupted()?;
        let l = offered(s);
        let file = lab.links_file(&format!("links-{}.toml", s.short()), &l)?;
        let plan = lab.dry_run(&file, o.per_host)?;
        let predicted = plan["plan"]["makespan"].as_f64().unwrap_or(f64::NAN);
        say(&format!(
            "{} {}: {} links offered, plan makespan {predicted:.2} s (lower bound {lower_bound_s:.2} s)",
            kind.name(),
            s.name(),
            l.len()
        ));
        if s == Strategy::Tandem {
            tandem_plan = plan.clone();
        }
        reports.push(StrategyReport {
            strategy: s.name().to_string(),
            links_offered: l.len(),
            egress_slots: (kind == TopoKind::Rack).then_some(1),
            predicted_s: predicted,
            planned_copies: plan_copies(&plan)
                .into_iter()
                .map(|(a, b, _)| format!("{a} -> {b}"))
                .collect(),
            runs: Vec::new(),
            makespan_p50_s: None,
            makespan_p99_s: None,
            actual_over_predicted_p50: None,
            over_lower_bound_p50: None,
            speedup_vs_all_from_source: None,
            source_sent_images_p50: None,
            local_copy_p50_ms: None,
            local_copy_methods: Vec::new(),
            transfer_over_link_p50: None,
        });
        files.push((file, predicted));
    }
    for run in 1..=o.runs {
        for (i, s) in STRATEGIES.iter().enumerate() {
            check_interrupted()?;
            let (file, predicted) = &files[i];
            let prefix = format!("{}{}{run}", &kind.name()[..1], s.short());
            let bound = Duration::from_secs_f64(60.0 + 5.0 * predicted.max(1.0));
            let r = lab.deploy(run, file, &prefix, o.per_host, bound)?;
            say(&format!(
                "{} {} run {run}/{}: {}{}",
                kind.name(),
                s.name(),
                o.runs,
                match r.elapsed_s {
                    Some(e) => format!("{} in {e:.2} s", r.state),
                    None => r.state.clone(),
                },
                r.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ));
            for a in &r.anomalies {
                say(&format!("  unexpected bytes: {a}"));
            }
            reports[i].runs.push(r);
        }
    }
    for s in &mut reports {
        let done: Vec<&RunReport> = s.runs.iter().filter(|r| r.state == "done").collect();
        let ms: Vec<f64> = done.iter().filter_map(|r| r.elapsed_s).collect();
        s.makespan_p50_s = pct(&ms, 50.0);
        s.makespan_p99_s = pct(&ms, 99.0);
        let ratios: Vec<f64> = done
            .iter()
            .filter_map(|r| Some(r.elapsed_s? / r.predicted_s.unwrap_or(s.predicted_s)))
            .collect();
        s.actual_over_predicted_p50 = pct(&ratios, 50.0);
        s.over_lower_bound_p50 = s.makespan_p50_s.map(|m| m / lower_bound_s);
        let sent: Vec<f64> = done.iter().map(|r| r.source_sent_images).collect();
        s.source_sent_images_p50 = pct(&sent, 50.0);
        let local: Vec<f64> = done
            .iter()
            .flat_map(|r| r.local_copies_ms.iter().copied())
            .collect();
        s.local_copy_p50_ms = pct(&local, 50.0);
        let xfer: Vec<f64> = done
            .iter()
            .flat_map(|r| r.transfer_over_link_time.iter().copied())
            .collect();
        s.transfer_over_link_p50 = pct(&xfer, 50.0);
        let mut methods = BTreeSet::new();
        for r in &done {
            methods.extend(r.local_methods.iter().cloned());
        }
        s.local_copy_methods = methods.into_iter().collect();
    }
    let afs = reports[1].makespan_p50_s;
    for s in &mut reports {
        s.speedup_vs_all_from_source = match (afs, s.makespan_p50_s) {
            (Some(a), Some(m)) if m > 0.0 => Some(a / m),
            _ => None,
        };
    }
    let slowed = if kind == TopoKind::Mesh {
        Some(slowed_link(lab, o, &all, &tandem_plan, say)?)
    } else {
        None
    };
    Ok((
        TopoReport {
            topology: kind,
            lower_bound_s,
            lower_bound,
            links,
            strategies: reports,
        },
        slowed,
    ))
}

/// The mesh with one link slowed 5× once its first transfer is under way:
/// every link offered (re-planning may re-route), then only the first
/// plan's links (no other route exists).
fn slowed_link(
    lab: &Lab,
    o: &Options,
    all: &[(usize, usize, f64)],
    plan: &Value,
    say: &mut dyn FnMut(&str),
) -> anyhow::Result<SlowedReport> {
    let n = o.hosts;
    let copies = plan_copies(plan);
    let predicted = plan["plan"]["makespan"].as_f64().unwrap_or(f64::NAN);
    // The plan's link from the source whose target feeds the most hosts.
    let parent: BTreeMap<&str, &str> = copies
        .iter()
        .map(|(a, b, _)| (b.as_str(), a.as_str()))
        .collect();
    let feeds = |h: &str| {
        parent
            .keys()
            .filter(|&&x| {
                let mut cur = x;
                while let Some(&p) = parent.get(cur) {
                    if cur == h {
                        return true;
                    }
                    cur = p;
                }
                false
            })
            .count()
    };
    let (from, to) = copies
        .iter()
        .filter(|(a, _, _)| a == "s")
        .max_by(|x, y| feeds(&x.1).cmp(&feeds(&y.1)).then(y.2.total_cmp(&x.2)))
        .or_else(|| copies.first())
        .map(|(a, b, _)| (a.clone(), b.clone()))
        .ok_or_else(|| anyhow!("the tandem plan has no network copy"))?;
    let (ia, ib) = (
        lab.index(&from).context("slowed link")?,
        lab.index(&to).context("slowed link")?,
    );
    let before = lab.rates[&(ia, ib)];
    let after = (before / SLOWDOWN * 10.0).round() / 10.0;
    let dev = format!("to-{to}");
    let mut time = vec![vec![None; n]; n];
    for &(a, b, t) in all {
        time[a][b] = Some(if (a, b) == (ia, ib) { t * SLOWDOWN } else { t });
    }
    let lower_bound_slow_s = shortest_from_source(&time)
        .iter()
        .copied()
        .fold(0.0, f64::max);
    let plan_only: Vec<(usize, usize, f64)> = all
        .iter()
        .copied()
        .filter(|&(a, b, _)| {
            copies
                .iter()
                .any(|(x, y, _)| lab.hosts[a].name == *x && lab.hosts[b].name == *y)
        })
        .collect();
    let files = [
        (
            "with re-planning",
            lab.links_file("links-t.toml", all)?,
            all.len(),
        ),
        (
            "the plan's links only",
            lab.links_file("links-plan-only.toml", &plan_only)?,
            plan_only.len(),
        ),
    ];
    let mut runs = Vec::new();
    for (i, (label, file, offered)) in files.iter().enumerate() {
        check_interrupted()?;
        say(&format!(
            "slowed link {from} -> {to} ({before} -> {after} Mbit/s once its copy starts), {label}"
        ));
        lab.tbf(&lab.hosts[ia].ns, &dev, before, "replace")?;
        let prefix = format!("ms{}", i + 1);
        lab.clear_copies(&prefix);
        let counters_before = lab.counters()?;
        let args = lab.deploy_args(file, &prefix, o.per_host, false);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Instant::now();
        let mut live = Live::start(lab.op_cmd(&args))?;
        let bound = Duration::from_secs_f64(60.0 + 5.0 * SLOWDOWN * predicted.max(1.0));
        let mut slowed_at = None;
        let mut err = None;
        match live.wait_line(&format!("network copy {from} -> {to}: "), bound) {
            Ok(_) => {
                lab.tbf(&lab.hosts[ia].ns, &dev, after, "replace")?;
                slowed_at = Some(t.elapsed().as_secs_f64());
            }
            Err(e) => err = Some(format!("{e:#}")),
        }
        check_interrupted()?;
        let finished = live.finish(bound.saturating_sub(t.elapsed()));
        let wall = t.elapsed().as_secs_f64();
        lab.tbf(&lab.hosts[ia].ns, &dev, before, "replace")?;
        check_interrupted()?;
        let counters_after = lab.counters()?;
        let mut r = match finished {
            Ok((status, stdout, stderr)) => lab.outcome(
                1,
                &prefix,
                &Ran {
                    status,
                    stdout,
                    stderr,
                    wall_s: wall,
                },
                &counters_before,
                &counters_after,
            ),
            Err(e) => RunReport {
                run: 1,
                prefix: prefix.clone(),
                state: "error".into(),
                wall_s: wall,
                error: Some(format!("{e:#}")),
                ..RunReport::default()
            },
        };
        if let Some(e) = err {
            r.error = Some(match r.error.take() {
                Some(x) => format!("{e}; {x}"),
                None => e,
            });
        }
        let k = (ia, dev.clone());
        let slowed_link_images = (counters_after.get(&k).unwrap_or(&0)
            - counters_before.get(&k).unwrap_or(&0)) as f64
            / lab.image_bytes as f64;
        let target_via = r
            .transfers
            .iter()
            .filter(|t| t.contains(&format!("-> {to} (done)")))
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let events: Vec<String> = r
            .transfers
            .iter()
            .filter(|t| !t.ends_with("(done)"))
            .cloned()
            .collect();
        say(&format!(
            "  {}: {}",
            label,
            match r.elapsed_s {
                Some(e) => format!("{} in {e:.2} s, {to} from {target_via}", r.state),
                None => format!("{} ({})", r.state, r.error.clone().unwrap_or_default()),
            }
        ));
        lab.clear_copies(&prefix);
        runs.push(SlowedRun {
            links_offered: *offered,
            run: r,
            slowed_at_s: slowed_at,
            slowed_link_images,
            target_via,
            events,
        });
    }
    let plan_links_only = runs.pop().expect("two runs");
    let with_replanning = runs.pop().expect("two runs");
    Ok(SlowedReport {
        from,
        to,
        mbit_before: before,
        mbit_after: after,
        predicted_s: predicted,
        planned_copies: copies
            .iter()
            .map(|(a, b, _)| format!("{a} -> {b}"))
            .collect(),
        lower_bound_slow_s,
        with_replanning,
        plan_links_only,
    })
}

// ------------------------------------------------------------ output

fn s2(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"))
}

/// A run's network copies against a plan's (`a -> b`): as planned, or
/// what was added and what is missing, and copies that did not finish.
fn route_diff(planned: &[String], transfers: &[String]) -> String {
    let done: Vec<&str> = transfers
        .iter()
        .filter_map(|t| t.strip_suffix(" (done)"))
        .collect();
    let extra: Vec<&str> = done
        .iter()
        .copied()
        .filter(|d| !planned.iter().any(|p| p == d))
        .collect();
    let missing: Vec<&str> = planned
        .iter()
        .map(String::as_str)
        .filter(|p| !done.contains(p))
        .collect();
    let unfinished: Vec<&str> = transfers
        .iter()
        .map(String::as_str)
        .filter(|t| !t.ends_with(" (done)"))
        .collect();
    let mut s = if extra.is_empty() && missing.is_empty() {
        "copies as planned".to_string()
    } else {
        format!(
            "copies differ: + {} / - {}",
            if extra.is_empty() {
                "none".into()
            } else {
                extra.join(", ")
            },
            if missing.is_empty() {
                "none".into()
            } else {
                missing.join(", ")
            }
        )
    };
    if !unfinished.is_empty() {
        s.push_str(&format!("; not finished: {}", unfinished.join(", ")));
    }
    s
}

/// The issue's goals at this size, reported, not asserted.
fn print_goals(r: &Report) {
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut lines = Vec::new();
    for t in &r.topologies {
        let name = t.topology.name();
        let Some(tandem) = t.strategies.iter().find(|s| s.strategy == "tandem") else {
            continue;
        };
        if let Some(x) = tandem.over_lower_bound_p50 {
            lines.push(format!(
                "{name}: tandem {x:.2}x the lower bound (<= 1.5x: {})",
                met(x <= 1.5)
            ));
        }
        let ratios: Vec<String> = t
            .strategies
            .iter()
            .filter_map(|s| {
                Some(format!(
                    "{} {:.2}",
                    s.strategy, s.actual_over_predicted_p50?
                ))
            })
            .collect();
        let all_close = t.strategies.iter().all(|s| {
            s.actual_over_predicted_p50
                .is_some_and(|x| (x - 1.0).abs() <= 0.15)
        });
        lines.push(format!(
            "{name}: actual/predicted {} (within 15 %: {})",
            ratios.join(", "),
            met(all_close)
        ));
        if t.topology == TopoKind::Rack {
            if let Some(x) = tandem.speedup_vs_all_from_source {
                let n = r.hosts;
                let ceiling = (n - 1) as f64 / f64::from(rounds(n).max(1));
                lines.push(format!(
                    "rack: tandem {x:.2}x faster than all-from-source (>= 3x: {}; store-and-forward with one send per host allows at most (N-1)/ceil(log2 N) = {ceiling:.2}x at N = {n})",
                    met(x >= 3.0)
                ));
            }
            if let Some(x) = tandem.source_sent_images_p50 {
                lines.push(format!(
                    "rack: the source sent {x:.2} images (<= 2: {})",
                    met(x <= 2.05)
                ));
            }
        }
        if let Some(ms) = tandem.local_copy_p50_ms {
            lines.push(format!(
                "{name}: a local clone ready in {ms:.0} ms p50, {} (<= 100 ms: {})",
                tandem.local_copy_methods.join("/"),
                met(ms <= 100.0)
            ));
        }
    }
    if !lines.is_empty() {
        println!("goals (the issue's, at this size; reported, not asserted):");
        for l in lines {
            println!("  {l}");
        }
    }
}

fn notes(v: &[String]) -> String {
    v.iter().map(|l| format!("\n    log: {l}")).collect()
}

pub fn print(r: &Report) {
    println!(
        "\nfan-out deployment: {} hosts (source s + {} targets, {} copies each: 1 over the network, {} local), {} MiB template, {} runs per strategy, seed {}",
        r.hosts,
        r.targets,
        r.per_host,
        r.per_host.saturating_sub(1),
        r.image_bytes >> 20,
        r.runs,
        r.seed
    );
    println!(
        "links: mesh each direction tbf in [{:.0}, {:.0}] Mbit/s, rack uplinks {:.0} Mbit/s; an image's time on a link = image x {:.4} (TCP/IP/TLS framing) / rate; datastores on {}; {} CPUs, load {} at start",
        r.rate_mbit / 4.0,
        r.rate_mbit,
        r.rate_mbit,
        r.wire_factor,
        r.datastore_fs,
        r.cpus,
        r.loadavg_at_start
    );
    println!(
        "{:<5} {:<16} {:>5} | {:>15} | {:>9} | {:>7} | {:>7} | {:>8} | {:>11} | {:>14} | {:>6} | {:>6}",
        "topo",
        "strategy",
        "links",
        "makespan s",
        "predicted",
        "actual/",
        "x lower",
        "speedup",
        "source sent",
        "local clone",
        "xfer/",
        "runs"
    );
    println!(
        "{:<5} {:<16} {:>5} | {:>15} | {:>9} | {:>7} | {:>7} | {:>8} | {:>11} | {:>14} | {:>6} | {:>6}",
        "", "", "", "p50 / p99", "s", "pred", "bound", "vs AFS", "images p50", "p50 ms", "link", "done"
    );
    for t in &r.topologies {
        for s in &t.strategies {
            let done = s.runs.iter().filter(|x| x.state == "done").count();
            println!(
                "{:<5} {:<16} {:>5} | {:>15} | {:>9.2} | {:>7} | {:>7} | {:>8} | {:>11} | {:>14} | {:>6} | {:>6}",
                t.topology.name(),
                s.strategy,
                s.links_offered,
                format!("{} / {}", s2(s.makespan_p50_s), s2(s.makespan_p99_s)),
                s.predicted_s,
                s2(s.actual_over_predicted_p50),
                s2(s.over_lower_bound_p50),
                s.speedup_vs_all_from_source
                    .map_or_else(|| "-".to_string(), |x| format!("{x:.2}x")),
                s2(s.source_sent_images_p50),
                match s.local_copy_p50_ms {
                    Some(ms) => format!("{ms:.0} ({})", s.local_copy_methods.join("/")),
                    None => "-".into(),
                },
                s2(s.transfer_over_link_p50),
                format!("{done}/{}", s.runs.len())
            );
        }
        println!(
            "{:<5} {:<16} {:>5} | {:>15} |   lower bound {:.2} s: {}",
            t.topology.name(),
            "lower bound",
            "",
            "",
            t.lower_bound_s,
            t.lower_bound
        );
    }
    println!("(makespan: the deployment view's elapsed_s, the manager's clock from the first copy to the last clone verified, local copies included; predicted: the first plan's makespan (dry run); actual/pred: median of each run's elapsed / its own plan's makespan; x lower bound and speedup vs all-from-source (AFS): p50 makespans; source sent: tx bytes of the source's veths (mesh) or uplink (rack) / image bytes (+~0.3 % TLS and headers); xfer/link: median over done network copies of the copy's own time / its link's planned time; local clone: the log's `ready (Copy|Reflink, N ms)`; rack: every strategy --egress-slots 1)");
    print_goals(r);
    println!("runs (makespan / that run's own plan, source sent, network copies against the first plan):");
    for t in &r.topologies {
        for s in &t.strategies {
            println!(
                "  {} {}: first plan {}",
                t.topology.name(),
                s.strategy,
                s.planned_copies.join(", ")
            );
            for x in &s.runs {
                println!(
                    "    run {}: {} s / {} s, source {:.2} images; {}",
                    x.run,
                    s2(x.elapsed_s),
                    s2(x.predicted_s),
                    x.source_sent_images,
                    route_diff(&s.planned_copies, &x.transfers)
                );
            }
        }
    }
    if let Some(sl) = &r.slowed {
        println!(
            "\nslowed link (mesh, tandem): {} -> {} cut from {} to {} Mbit/s once its first copy started; first plan {:.2} s; lower bound had the slow rate been known at the start {:.2} s",
            sl.from, sl.to, sl.mbit_before, sl.mbit_after, sl.predicted_s, sl.lower_bound_slow_s
        );
        for (label, x) in [
            ("with re-planning (all links offered)", &sl.with_replanning),
            (
                "without re-routing (the plan's links only)",
                &sl.plan_links_only,
            ),
        ] {
            println!(
                "  {label:<44} {:>3} links: makespan {} s, slowed at {} s, the slowed link carried {:.2} images, {} got its copy from {}; {}",
                x.links_offered,
                s2(x.run.elapsed_s),
                s2(x.slowed_at_s),
                x.slowed_link_images,
                sl.to,
                if x.target_via.is_empty() { "-" } else { &x.target_via },
                route_diff(&sl.planned_copies, &x.run.transfers)
            );
        }
        for (label, x) in [
            ("with re-planning", &sl.with_replanning),
            ("plan's links only", &sl.plan_links_only),
        ] {
            for l in &x.run.notes {
                println!("  {label}: {l}");
            }
        }
        println!("  (re-planning cannot be turned off from the CLI; offering only the first plan's links leaves the executor no other route, so it carries out the first plan as it is)");
    }
    let mut problems = Vec::new();
    for t in &r.topologies {
        for s in &t.strategies {
            for x in &s.runs {
                if let Some(e) = &x.error {
                    problems.push(format!(
                        "{} {} run {} ({}): {e}{}",
                        t.topology.name(),
                        s.strategy,
                        x.run,
                        x.state,
                        notes(&x.notes)
                    ));
                }
                for a in &x.anomalies {
                    problems.push(format!(
                        "{} {} run {}: {a}",
                        t.topology.name(),
                        s.strategy,
                        x.run
                    ));
                }
            }
        }
    }
    if let Some(sl) = &r.slowed {
        for (label, x) in [
            ("with re-planning", &sl.with_replanning),
            ("plan's links only", &sl.plan_links_only),
        ] {
            if let Some(e) = &x.run.error {
                problems.push(format!("slowed link, {label}: {e}{}", notes(&x.run.notes)));
            }
            for a in &x.run.anomalies {
                problems.push(format!("slowed link, {label}: {a}"));
            }
        }
    }
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    println!("reproduce: {}", r.reproduce);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_bounds() {
        assert_eq!(rounds(1), 0);
        assert_eq!(rounds(2), 1);
        assert_eq!(rounds(8), 3);
        assert_eq!(rounds(9), 4);
        // The seed's G3: s→h1→h2→h3 = 10 + 10 + 5 = 25 beats s→h3 (45).
        let mut t = vec![vec![None; 4]; 4];
        for (a, b, s) in [
            (0, 1, 10.0),
            (0, 2, 30.0),
            (0, 3, 45.0),
            (1, 2, 10.0),
            (1, 3, 15.0),
            (2, 1, 10.0),
            (2, 3, 5.0),
            (3, 1, 15.0),
            (3, 2, 5.0),
        ] {
            t[a][b] = Some(s);
        }
        assert_eq!(shortest_from_source(&t), vec![0.0, 10.0, 20.0, 25.0]);
    }

    #[test]
    fn log_lines_are_read() {
        assert_eq!(
            local_copy_of("[   3.21 s] h1: mt1-02.img ready (Copy, 87 ms)"),
            Some(("Copy".to_string(), 87.0))
        );
        assert_eq!(local_copy_of("[   1.00 s] network copy s -> h1: x"), None);
        assert_eq!(
            makespan_in("plan at 0\n    0   1  network copy\nmakespan 12.345"),
            Some(12.345)
        );
        assert_eq!("both".parse::<Topologies>().unwrap().kinds().len(), 2);
        assert!("ring".parse::<Topologies>().is_err());
    }
}
