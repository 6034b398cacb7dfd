//! `tandem bench dvs`: the distributed switch's three measurements of
//! issue 16, with a real `tandem-manager` and real tandemds.
//!
//! 1. **cut** (the management fabric, as `tests/cluster.rs`): namespaces
//!    `tdvsPIDf` (a bridge), `tdvsPIDm` (the manager, 10.232.0.1) and one
//!    per host (`tdvsPIDa`, `tdvsPIDb`), where each host's management
//!    address is on a host port of its tandem switch (port group `mgmt`,
//!    VLAN 10) and the only way out is the switch's uplink `up0`, a trunk
//!    whose native VLAN is 10, cabled to the bridge. Per run, `tandem dvs
//!    apply --timeout T --canary ha` of a document that moves `mgmt` to
//!    VLAN 20, so ha is cut off; measured from just before the CLI starts
//!    to (a) ha's rollback (`last.at_ms` of its `switch txn`, its own
//!    clock, which is this machine's), (b) the end of the first host API
//!    call from the manager's namespace that succeeds (`tandem --remote
//!    ha@… switch txn`, tried once the rollback is seen), (c) the first
//!    100 ms poll of `tandem dvs show` with ha `resynced` for that
//!    transaction.
//! 2. **down** (the same fabric): `ping -i 0.01` from ha's host port to
//!    hb's for the whole window; the manager stopped (SIGTERM) for
//!    `--down-s`, started again; frames sent/received/lost, both switches'
//!    drop counters before and after, and from the manager answering
//!    again until both hosts are `online` with a heartbeat newer than the
//!    restart.
//! 3. **commit**: one namespace `tdvsPIDc` (loopback only): the manager on
//!    127.0.0.1, N tandemds each serving `--host-api` on its own address
//!    127.0.1.X:7444 with port groups only (no uplink; the commit path
//!    needs no cut). A first revision (every host changes), then
//!    `--changes` revisions that alter the shared port group `bench`'s
//!    VLAN (every host changes: the canary, then a wave of N-1); per
//!    change the report's `elapsed_ms` and the wall time of `tandem dvs
//!    apply`, and every host's result.
//!
//! Namespaces carry this process's pid and are deleted on every exit path
//! (guards' `Drop`; SIGINT/SIGTERM end the run through the error path).
//! Every loop is bounded in time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;

use super::cluster::{
    block_on, check_interrupted, install_signal_handlers, pct, run_bounded, sleep, stop_child,
    tail, Dist, Lab,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    Cut,
    Commit,
    Down,
}

impl std::str::FromStr for Which {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cut" => Ok(Which::Cut),
            "commit" => Ok(Which::Commit),
            "down" => Ok(Which::Down),
            _ => Err(format!("`{s}`: cut, commit or down")),
        }
    }
}

impl std::fmt::Display for Which {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Which::Cut => "cut",
            Which::Commit => "commit",
            Which::Down => "down",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub which: Vec<Which>,
    pub runs: usize,
    pub timeout_s: u32,
    pub hosts: usize,
    pub changes: usize,
    pub down_s: u64,
    pub tandemd: PathBuf,
    pub image_dir: PathBuf,
    pub work_dir: PathBuf,
}

/// One cut run, ms from just before `tandem dvs apply` started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CutRun {
    /// The host's deadline armed (deadline − timeout): the transaction
    /// reached it.
    pub txn_at_host_ms: Option<f64>,
    /// The host's own rollback time (`last.at_ms`).
    pub rolled_back_ms: f64,
    /// The first host API call from the manager's namespace that succeeded
    /// (its end).
    pub reachable_ms: f64,
    /// The first `dvs show` poll with the host resynced.
    pub resynced_ms: f64,
    /// `tandem dvs apply` ended (exit 7 expected).
    pub apply_wall_ms: f64,
    /// The report's `elapsed_ms`.
    pub apply_elapsed_ms: u64,
    pub outcome: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CutReport {
    pub timeout_s: u32,
    pub runs: Vec<CutRun>,
    pub rolled_back: Dist,
    pub reachable: Dist,
    pub resynced: Dist,
    pub apply_wall: Dist,
    /// Goal: restored and reachable within timeout + 1 s.
    pub goal_ms: f64,
    pub goal_met_p99: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CommitChange {
    pub revision: u64,
    pub outcome: String,
    pub committed: usize,
    pub hosts: usize,
    pub elapsed_ms: u64,
    pub wall_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CommitReport {
    pub hosts: usize,
    /// The first revision (every host from its local document).
    pub first: CommitChange,
    pub changes: Vec<CommitChange>,
    pub elapsed: Dist,
    pub wall: Dist,
    pub all_committed: bool,
    pub goal_met_p99: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DownReport {
    pub down_s: f64,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub frames_lost: u64,
    /// Echo requests without a reply among those up to the last replied
    /// one: losses, not the requests still in flight when ping stopped.
    pub lost_before_last_reply: u64,
    pub last_replied_seq: u64,
    pub ping_summary: String,
    /// Per host: drops by reason before and after (nonzero reasons only),
    /// and the totals.
    pub drops_before: Vec<(String, u64)>,
    pub drops_after: Vec<(String, u64)>,
    pub drop_reasons_after: Vec<(String, String)>,
    /// Manager answering again → each host online with a newer heartbeat.
    pub online_again_ms: Vec<(String, f64)>,
    pub manager_start_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub load_before: String,
    pub load_after: String,
    pub cut: Option<CutReport>,
    pub down: Option<DownReport>,
    pub commit: Option<CommitReport>,
}

// ------------------------------------------------------------ helpers

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Runs `argv`, requiring success (bounded to 30 s).
fn run_ok(argv: &[&str], dir: &Path) -> anyhow::Result<String> {
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..]);
    let (st, out, err) = run_bounded(c, dir, Duration::from_secs(30))?;
    if !st.success() {
        bail!("{}: {st}: {}", argv.join(" "), err.trim());
    }
    Ok(out)
}

/// A network namespace this process made; deleted on drop.
struct Netns {
    name: String,
    dir: PathBuf,
}

impl Netns {
    fn new(name: String, dir: &Path) -> anyhow::Result<Netns> {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(&["ip", "netns", "add", &name], dir)?;
        let ns = Netns {
            name,
            dir: dir.to_path_buf(),
        };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn run(&self, argv: &[&str]) -> anyhow::Result<String> {
        let mut a = vec!["ip", "netns", "exec", &self.name];
        a.extend_from_slice(argv);
        run_ok(&a, &self.dir)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A scratch directory for commands run before a lab exists.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A host's local API (its unix socket): GET `path` as JSON.
fn host_get(socket: &Path, path: &str) -> anyhow::Result<Value> {
    let c = tandem_api::Client::new(socket);
    Ok(block_on(c.get::<Value>(path))?)
}

/// Sum of a port's drop counters, and the nonzero reasons.
fn drops(stats: &Value) -> (u64, Vec<String>) {
    let mut total = 0;
    let mut reasons = Vec::new();
    for p in stats["ports"].as_array().into_iter().flatten() {
        if let Some(d) = p["counters"]["drops"].as_object() {
            for (r, n) in d {
                let n = n.as_u64().unwrap_or(0);
                total += n;
                if n > 0 {
                    reasons.push(format!("{}:{r}={n}", p["name"].as_str().unwrap_or("?")));
                }
            }
        }
    }
    (total, reasons)
}

fn dvs_host(lab: &Lab, host: &str) -> anyhow::Result<Value> {
    let out = lab.cli(&["--json", "dvs", "show"], Duration::from_secs(15))?;
    let v: Value = serde_json::from_str(&out).context("parsing `tandem dvs show --json`")?;
    Ok(v["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["host"] == host)
        .cloned()
        .unwrap_or(Value::Null))
}

/// `tandem --json dvs apply FILE --timeout T [--canary C]`: exit code,
/// report, wall ms.
fn dvs_apply(
    lab: &Lab,
    doc: &str,
    timeout_s: u32,
    canary: Option<&str>,
) -> anyhow::Result<(i32, Value, f64)> {
    let f = lab.dir.join("dvs.toml");
    std::fs::write(&f, doc)?;
    let f = f.to_string_lossy().into_owned();
    let t = timeout_s.to_string();
    let mut args = vec!["--json", "dvs", "apply", &f, "--timeout", &t];
    if let Some(c) = canary {
        args.extend(["--canary", c]);
    }
    let t0 = Instant::now();
    let (st, out, err) = lab.cli_status(
        lab.netns(),
        &args,
        Duration::from_secs(u64::from(timeout_s) * 4 + 30),
    )?;
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let report: Value = serde_json::from_str(&out).with_context(|| {
        format!(
            "dvs apply printed no report ({st}): {out}{err}\nmanager log:\n{}",
            tail(lab.manager_log(), 20)
        )
    })?;
    Ok((st.code().unwrap_or(-1), report, wall))
}

fn online_since(h: &Value, since_s: u64) -> bool {
    h["connection"] == "online" && h["last_seen"].as_u64().unwrap_or(0) >= since_s
}

// ------------------------------------------------------------ the fabric

const MGMT_NET: &str = "10.232.0";
const HOST_API_PORT: u16 = 7444;

/// A host's local switch document on the fabric (as `tests/harness/fabric.rs`).
fn host_switch_doc(ip: &str) -> String {
    format!(
        r#"[[port_group]]
name = "mgmt"
vlan = 10

[[port_group]]
name = "trunk"
vlan_mode = "trunk"
native_vlan = 10
allowed_vlans = [30]

[[uplink]]
name = "up"
interfaces = ["up0"]
port_group = "trunk"

[[host_port]]
name = "mgmt"
tap = "mgmt0"
port_group = "mgmt"
addresses = ["{ip}/24"]
"#
    )
}

/// The fabric's distributed switch with `mgmt` on `vlan`.
fn fabric_dvs_doc(vlan: u16, hosts: &[(&str, &str)]) -> String {
    let mut d = format!(
        "[[port_group]]\nname = \"mgmt\"\nvlan = {vlan}\n\n[[port_group]]\nname = \"trunk\"\nvlan_mode = \"trunk\"\nnative_vlan = 10\nallowed_vlans = [30]\n"
    );
    for (name, ip) in hosts {
        d.push_str(&format!(
            "\n[[host]]\nname = \"{name}\"\n[[host.uplink]]\nname = \"up\"\ninterfaces = [\"up0\"]\nport_group = \"trunk\"\n[[host.host_port]]\nname = \"mgmt\"\ntap = \"mgmt0\"\nport_group = \"mgmt\"\naddresses = [\"{ip}/24\"]\n"
        ));
    }
    d
}

/// Fields drop in order: the processes first, then the namespaces.
struct Fabric {
    lab: Lab,
    ips: Vec<String>,
    _hosts: Vec<Netns>,
    mgr: Netns,
    _fab: Netns,
    _scratch: Scratch,
}

impl Fabric {
    fn host_ns(&self, i: usize) -> &str {
        &self._hosts[i].name
    }
}

fn build_fabric(o: &Options, say: &mut dyn FnMut(&str)) -> anyhow::Result<Fabric> {
    let pid = std::process::id();
    let scratch = Scratch(o.work_dir.join(format!("tdvs-ns-{pid}")));
    std::fs::create_dir_all(&scratch.0)?;
    let d = scratch.0.clone();
    let fab = Netns::new(format!("tdvs{pid}f"), &d)?;
    let mgr = Netns::new(format!("tdvs{pid}m"), &d)?;
    fab.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
    fab.run(&["ip", "link", "set", "br0", "up"])?;
    run_ok(
        &[
            "ip", "-n", &fab.name, "link", "add", "fm0", "type", "veth", "peer", "name", "m0",
            "netns", &mgr.name,
        ],
        &d,
    )?;
    fab.run(&["ip", "link", "set", "fm0", "master", "br0", "up"])?;
    mgr.run(&[
        "ip",
        "addr",
        "add",
        &format!("{MGMT_NET}.1/24"),
        "dev",
        "m0",
    ])?;
    mgr.run(&["ip", "link", "set", "m0", "up"])?;
    let names = ["ha", "hb"];
    let mut hosts = Vec::new();
    let mut ips = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let ns = Netns::new(format!("tdvs{pid}{}", &n[1..]), &d)?;
        let peer = format!("v{n}");
        run_ok(
            &[
                "ip", "-n", &fab.name, "link", "add", &peer, "type", "veth", "peer", "name", "up0",
                "netns", &ns.name,
            ],
            &d,
        )?;
        fab.run(&["ip", "link", "set", &peer, "master", "br0", "up"])?;
        ns.run(&["ip", "link", "set", "up0", "up"])?;
        hosts.push(ns);
        ips.push(format!("{MGMT_NET}.{}", 11 + i));
    }
    let addr = format!("{MGMT_NET}.1:7443");
    let lab = Lab::new(
        "tdvs",
        &o.work_dir,
        addr.clone(),
        Some(mgr.name.clone()),
        names
            .iter()
            .zip(&hosts)
            .map(|(n, ns)| (n.to_string(), Some(ns.name.clone())))
            .collect(),
    )?;
    let mut f = Fabric {
        lab,
        ips,
        _hosts: hosts,
        mgr,
        _fab: fab,
        _scratch: scratch,
    };
    say(&format!(
        "fabric: manager {addr} in {}, hosts ha {} / hb {} behind their switches",
        f.mgr.name, f.ips[0], f.ips[1]
    ));
    f.lab.init_cluster("bench")?;
    f.lab.start_manager()?;
    for i in 0..2 {
        let doc = host_switch_doc(&f.ips[i]);
        f.lab
            .start_host_with(i, &o.tandemd, &o.image_dir, &doc, &[])?;
        f.lab.wait_host_socket(i, Duration::from_secs(30))?;
    }
    // The management path is the switch: each host reaches the manager
    // through its host port and uplink (bounded: 20 pings, 1 s apart).
    for i in 0..2 {
        f._hosts[i]
            .run(&["ping", "-c", "1", "-w", "20", &format!("{MGMT_NET}.1")])
            .with_context(|| format!("host {i} reaching the manager through its switch"))?;
    }
    for i in 0..2 {
        f.lab.join_host(i)?;
        let ip = f.ips[i].clone();
        let args = vec![
            "--host-api".to_string(),
            format!("0.0.0.0:{HOST_API_PORT}"),
            "--host-api-advertise".to_string(),
            format!("{ip}:{HOST_API_PORT}"),
        ];
        f.lab
            .start_host_with(i, &o.tandemd, &o.image_dir, &host_switch_doc(&ip), &args)?;
        f.lab.wait_host_socket(i, Duration::from_secs(30))?;
    }
    wait_online(&f.lab, 0, Duration::from_secs(60))?;
    Ok(f)
}

/// Until every host is online with its host API reported and a heartbeat
/// at or after `since_s`; per host, ms from the call.
fn wait_online(lab: &Lab, since_s: u64, timeout: Duration) -> anyhow::Result<Vec<(String, f64)>> {
    let t0 = Instant::now();
    let mut seen: Vec<(String, f64)> = Vec::new();
    while seen.len() < lab.hosts.len() {
        check_interrupted()?;
        if t0.elapsed() > timeout {
            bail!(
                "hosts not online within {timeout:?}: seen {:?}; manager log:\n{}",
                seen,
                tail(lab.manager_log(), 15)
            );
        }
        let polled = t0.elapsed().as_secs_f64() * 1e3;
        for h in lab.host_list().unwrap_or_default() {
            let Some(name) = h["name"].as_str() else {
                continue;
            };
            if !seen.iter().any(|(n, _)| n == name)
                && online_since(&h, since_s)
                && h["host_api"].is_string()
            {
                seen.push((name.to_string(), polled));
            }
        }
        sleep(Duration::from_millis(250))?;
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(seen)
}

// ------------------------------------------------------------ 1. cut

fn cut_bench(f: &Fabric, o: &Options, say: &mut dyn FnMut(&str)) -> anyhow::Result<CutReport> {
    let lab = &f.lab;
    let hosts: Vec<(&str, &str)> = vec![("ha", &f.ips[0]), ("hb", &f.ips[1])];
    let good = fabric_dvs_doc(10, &hosts);
    let (code, r, _) = dvs_apply(lab, &good, 30, Some("ha"))?;
    if code != 0 {
        bail!("the first revision did not complete: {r}");
    }
    let good_rev = r["revision"].as_u64().unwrap_or(0);
    let cut = fabric_dvs_doc(20, &hosts);
    let socket = lab.hosts[0].socket.clone();
    let remote = format!("ha@{}:{HOST_API_PORT}", f.ips[0]);
    let op = lab.operator().to_string_lossy().into_owned();
    let mut rep = CutReport {
        timeout_s: o.timeout_s,
        goal_ms: f64::from(o.timeout_s) * 1e3 + 1e3,
        ..CutReport::default()
    };
    let bound = Duration::from_secs(u64::from(o.timeout_s) * 4 + 40);
    for k in 0..o.runs {
        check_interrupted()?;
        let prev_txid = dvs_host(lab, "ha")?["last_txid"].clone();
        let t0_ms = now_ms();
        let t0 = Instant::now();
        let run = std::thread::scope(|s| -> anyhow::Result<CutRun> {
            let apply = s.spawn(|| {
                let r = dvs_apply(lab, &cut, o.timeout_s, Some("ha"));
                (r, t0.elapsed().as_secs_f64() * 1e3)
            });
            let resync = s.spawn(|| -> anyhow::Result<f64> {
                let end = Instant::now() + bound;
                while Instant::now() < end {
                    let polled = t0.elapsed().as_secs_f64() * 1e3;
                    if let Ok(v) = dvs_host(lab, "ha") {
                        if v["state"] == "resynced"
                            && v["last_txid"].is_string()
                            && v["last_txid"] != prev_txid
                            && v["revision"].as_u64() == Some(good_rev)
                        {
                            return Ok(polled);
                        }
                    }
                    sleep(Duration::from_millis(100))?;
                }
                bail!("ha not resynced within {bound:?}")
            });
            // (a) the host's rollback, from its local socket.
            let mut deadline_ms: Option<f64> = None;
            let end = Instant::now() + bound;
            let rolled = loop {
                check_interrupted()?;
                if Instant::now() > end {
                    bail!("ha did not roll back within {bound:?}");
                }
                if let Ok(st) = host_get(&socket, "/v1/switch/txn") {
                    if let Some(d) = st["pending"]["deadline_in_ms"].as_f64() {
                        deadline_ms.get_or_insert(now_ms() + d);
                    }
                    let at = st["last"]["at_ms"].as_f64().unwrap_or(0.0);
                    if st["last"]["outcome"] == "rolled-back" && at >= t0_ms {
                        break at - t0_ms;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            // (b) the manager reaches ha's API again.
            let end = Instant::now() + bound;
            let reachable = loop {
                check_interrupted()?;
                if Instant::now() > end {
                    bail!("ha's API not reachable from the manager within {bound:?}");
                }
                let ok = lab
                    .cli_status(
                        lab.netns(),
                        &[
                            "--remote",
                            &remote,
                            "--remote-identity",
                            &op,
                            "switch",
                            "txn",
                        ],
                        Duration::from_secs(3),
                    )
                    .is_ok_and(|(st, _, _)| st.success());
                if ok {
                    break t0.elapsed().as_secs_f64() * 1e3;
                }
                sleep(Duration::from_millis(50))?;
            };
            let (applied, apply_wall_ms) = apply.join().expect("apply thread");
            let (code, report, _) = applied?;
            let resynced = resync.join().expect("resync thread")?;
            if code != 7 {
                bail!("the cut was not reported as not completed (exit {code}): {report}");
            }
            Ok(CutRun {
                txn_at_host_ms: deadline_ms.map(|d| d - f64::from(o.timeout_s) * 1e3 - t0_ms),
                rolled_back_ms: rolled,
                reachable_ms: reachable,
                resynced_ms: resynced,
                apply_wall_ms,
                apply_elapsed_ms: report["elapsed_ms"].as_u64().unwrap_or(0),
                outcome: report["outcome"].as_str().unwrap_or("?").to_string(),
            })
        })?;
        say(&format!(
            "cut {}/{}: rolled back {:.0} ms, reachable {:.0} ms, resynced {:.0} ms (apply {} {:.0} ms; load {})",
            k + 1,
            o.runs,
            run.rolled_back_ms,
            run.reachable_ms,
            run.resynced_ms,
            run.outcome,
            run.apply_wall_ms,
            loadavg()
        ));
        rep.runs.push(run);
        // Let the host's agent settle (its sync delivered) before the next.
        sleep(Duration::from_millis(500))?;
    }
    let col = |g: &dyn Fn(&CutRun) -> f64| rep.runs.iter().map(g).collect::<Vec<f64>>();
    rep.rolled_back = Dist::of(&col(&|r| r.rolled_back_ms));
    rep.reachable = Dist::of(&col(&|r| r.reachable_ms));
    rep.resynced = Dist::of(&col(&|r| r.resynced_ms));
    rep.apply_wall = Dist::of(&col(&|r| r.apply_wall_ms));
    rep.goal_met_p99 = rep.rolled_back.p99_ms <= rep.goal_ms && rep.reachable.p99_ms <= rep.goal_ms;
    Ok(rep)
}

// ------------------------------------------------------------ 2. down

/// A child killed on drop.
struct Guarded(Option<Child>);

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            stop_child(&mut c, Duration::from_secs(3));
        }
    }
}

fn parse_ping(out: &str) -> (u64, u64) {
    // "N packets transmitted, M received, …"
    let Some(l) = out.lines().find(|l| l.contains("packets transmitted")) else {
        return (0, 0);
    };
    let nums: Vec<u64> = l
        .split(',')
        .filter_map(|p| p.split_whitespace().next()?.parse().ok())
        .collect();
    (
        nums.first().copied().unwrap_or(0),
        nums.get(1).copied().unwrap_or(0),
    )
}

/// (highest icmp_seq replied to, replies missing up to it) from ping's
/// per-reply lines.
fn ping_gaps(out: &str) -> (u64, u64) {
    let seqs: std::collections::BTreeSet<u64> = out
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            let v = l.split("icmp_seq=").nth(1)?;
            v.split_whitespace().next()?.parse().ok()
        })
        .collect();
    let Some(&last) = seqs.last() else {
        return (0, 0);
    };
    // Sequence numbers start at 1.
    (last, last.saturating_sub(seqs.len() as u64))
}

fn down_bench(
    f: &mut Fabric,
    o: &Options,
    say: &mut dyn FnMut(&str),
) -> anyhow::Result<DownReport> {
    let mut rep = DownReport::default();
    let stats = |f: &Fabric| -> anyhow::Result<Vec<(String, u64, Vec<String>)>> {
        f.lab
            .hosts
            .iter()
            .map(|h| {
                let (t, r) = drops(&host_get(&h.socket, "/v1/switch/stats")?);
                Ok((h.name.clone(), t, r))
            })
            .collect()
    };
    rep.drops_before = stats(f)?.into_iter().map(|(n, t, _)| (n, t)).collect();
    let out_path = f.lab.dir.join("ping.out");
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            f.host_ns(0),
            "ping",
            "-i",
            "0.01",
            "-W",
            "1",
        ])
        .arg(&f.ips[1])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting ping")?;
    let mut ping = Guarded(Some(child));
    say(&format!(
        "down: ping -i 0.01 ha → hb; manager stopped for {} s",
        o.down_s
    ));
    sleep(Duration::from_secs(2))?;
    let t = Instant::now();
    f.lab.stop_manager();
    sleep(Duration::from_secs(o.down_s))?;
    rep.down_s = t.elapsed().as_secs_f64();
    let started_s = (now_ms() / 1e3) as u64;
    let t = Instant::now();
    f.lab.start_manager()?;
    rep.manager_start_ms = t.elapsed().as_secs_f64() * 1e3;
    // From the manager answering again (wait_online's own start).
    rep.online_again_ms = wait_online(&f.lab, started_s, Duration::from_secs(60))?;
    sleep(Duration::from_secs(2))?;
    // SIGINT: ping prints its summary and exits.
    if let Some(c) = ping.0.as_mut() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end && !matches!(c.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(ping);
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let (sent, recv) = parse_ping(&out);
    rep.frames_sent = sent;
    rep.frames_received = recv;
    rep.frames_lost = sent.saturating_sub(recv);
    (rep.last_replied_seq, rep.lost_before_last_reply) = ping_gaps(&out);
    rep.ping_summary = out
        .lines()
        .filter(|l| l.contains("transmitted") || l.starts_with("rtt"))
        .collect::<Vec<_>>()
        .join("; ");
    let after = stats(f)?;
    rep.drops_after = after.iter().map(|(n, t, _)| (n.clone(), *t)).collect();
    rep.drop_reasons_after = after
        .into_iter()
        .map(|(n, _, r)| (n, r.join(" ")))
        .collect();
    if sent == 0 {
        bail!("ping printed no summary: {out}");
    }
    Ok(rep)
}

// ------------------------------------------------------------ 3. commit

fn commit_doc(names: &[String], vlan: u16) -> String {
    let mut d = format!(
        "[[port_group]]\nname = \"vms\"\nvlan = 10\n\n[[port_group]]\nname = \"bench\"\nvlan = {vlan}\n"
    );
    for n in names {
        d.push_str(&format!("\n[[host]]\nname = \"{n}\"\n"));
    }
    d
}

fn change_of(r: &Value, wall_ms: f64) -> CommitChange {
    let hosts = r["hosts"].as_array().cloned().unwrap_or_default();
    CommitChange {
        revision: r["revision"].as_u64().unwrap_or(0),
        outcome: r["outcome"].as_str().unwrap_or("?").to_string(),
        committed: hosts.iter().filter(|h| h["result"] == "committed").count(),
        hosts: hosts.len(),
        elapsed_ms: r["elapsed_ms"].as_u64().unwrap_or(0),
        wall_ms,
    }
}

fn commit_bench(o: &Options, say: &mut dyn FnMut(&str)) -> anyhow::Result<CommitReport> {
    let pid = std::process::id();
    let scratch = Scratch(o.work_dir.join(format!("tdvs-c-{pid}")));
    std::fs::create_dir_all(&scratch.0)?;
    let ns = Netns::new(format!("tdvs{pid}c"), &scratch.0)?;
    let names: Vec<String> = (0..o.hosts).map(|i| format!("h{i:03}")).collect();
    let mut lab = Lab::new(
        "tdvsc",
        &o.work_dir,
        "127.0.0.1:7443".into(),
        Some(ns.name.clone()),
        names
            .iter()
            .map(|n| (n.clone(), Some(ns.name.clone())))
            .collect(),
    )?;
    say(&format!(
        "commit: manager and {} tandemds in {} (loopback), host APIs on 127.0.1.X:{HOST_API_PORT}",
        o.hosts, ns.name
    ));
    lab.init_cluster("bench")?;
    lab.start_manager()?;
    for i in 0..o.hosts {
        check_interrupted()?;
        lab.join_host(i)?;
    }
    let local = "[[port_group]]\nname = \"vms\"\nvlan = 10\n";
    for i in 0..o.hosts {
        check_interrupted()?;
        let api = format!("127.0.1.{}:{HOST_API_PORT}", i + 1);
        let args = vec!["--host-api".to_string(), api];
        lab.start_host_with(i, &o.tandemd, &o.image_dir, local, &args)?;
    }
    for i in 0..o.hosts {
        lab.wait_host_socket(i, Duration::from_secs(60))?;
    }
    wait_online(&lab, 0, Duration::from_secs(120))?;
    let mut rep = CommitReport {
        hosts: o.hosts,
        ..CommitReport::default()
    };
    let (code, r, wall) = dvs_apply(&lab, &commit_doc(&names, 100), 30, None)?;
    rep.first = change_of(&r, wall);
    if code != 0 {
        bail!("the first revision did not complete: {r}");
    }
    say(&format!(
        "commit: first revision on {} hosts: {} in {} ms",
        o.hosts, rep.first.outcome, rep.first.elapsed_ms
    ));
    for k in 0..o.changes {
        check_interrupted()?;
        sleep(Duration::from_secs(1))?;
        let vlan = 101 + (k % 100) as u16;
        let (_, r, wall) = dvs_apply(&lab, &commit_doc(&names, vlan), 30, None)?;
        let c = change_of(&r, wall);
        say(&format!(
            "commit {}/{}: revision {} {} ({}/{} committed) elapsed {} ms, wall {:.0} ms (load {})",
            k + 1,
            o.changes,
            c.revision,
            c.outcome,
            c.committed,
            c.hosts,
            c.elapsed_ms,
            c.wall_ms,
            loadavg()
        ));
        rep.changes.push(c);
    }
    let el: Vec<f64> = rep.changes.iter().map(|c| c.elapsed_ms as f64).collect();
    let wl: Vec<f64> = rep.changes.iter().map(|c| c.wall_ms).collect();
    rep.elapsed = Dist::of(&el);
    rep.wall = Dist::of(&wl);
    rep.all_committed = rep
        .changes
        .iter()
        .all(|c| c.outcome == "completed" && c.committed == o.hosts);
    rep.goal_met_p99 = rep.all_committed && pct(&el, 99.0) < 1000.0;
    drop(lab);
    drop(ns);
    Ok(rep)
}

// ------------------------------------------------------------ run, print

pub fn run(o: &Options, mut say: impl FnMut(&str)) -> anyhow::Result<Report> {
    if !(5..=60).contains(&o.timeout_s) {
        bail!("--timeout-s: 5 to 60");
    }
    if o.hosts == 0 || o.hosts > 200 {
        bail!("--hosts: 1 to 200");
    }
    if o.runs == 0 || o.runs > 1000 || o.changes == 0 || o.changes > 1000 {
        bail!("--runs and --changes: 1 to 1000");
    }
    if o.down_s > 3600 {
        bail!("--down-s: at most 3600");
    }
    if !o.tandemd.is_file() {
        bail!("tandemd not found at {}", o.tandemd.display());
    }
    install_signal_handlers();
    let mut r = Report {
        load_before: loadavg(),
        ..Report::default()
    };
    if o.which.contains(&Which::Cut) || o.which.contains(&Which::Down) {
        let mut f = build_fabric(o, &mut say)?;
        if o.which.contains(&Which::Cut) {
            r.cut = Some(cut_bench(&f, o, &mut say)?);
        }
        if o.which.contains(&Which::Down) {
            r.down = Some(down_bench(&mut f, o, &mut say)?);
        }
    }
    if o.which.contains(&Which::Commit) {
        r.commit = Some(commit_bench(o, &mut say)?);
    }
    r.load_after = loadavg();
    Ok(r)
}

fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} s", v / 1e3)
    } else {
        format!("{v:.0} ms")
    }
}

pub fn print(o: &Options, r: &Report) {
    let row = |what: &str, d: &Dist| {
        println!(
            "{what:<52} {:>4} {:>10} {:>10} {:>10}",
            d.n,
            ms(d.p50_ms),
            ms(d.p99_ms),
            ms(d.max_ms)
        )
    };
    let head = || {
        println!(
            "{:<52} {:>4} {:>10} {:>10} {:>10}",
            "", "n", "p50", "p99", "max"
        )
    };
    println!(
        "\nload average (1/5/15 min): {} before, {} after",
        r.load_before, r.load_after
    );
    if let Some(c) = &r.cut {
        println!(
            "\ncut → restored: `dvs apply --timeout {}` moving the canary's management VLAN 10 → 20 (management through its switch), {} runs; from the apply request",
            c.timeout_s,
            c.runs.len()
        );
        head();
        let at_host: Vec<f64> = c.runs.iter().filter_map(|x| x.txn_at_host_ms).collect();
        row(
            "transaction at the host (deadline − timeout)",
            &Dist::of(&at_host),
        );
        row(
            "host rolled back (its switch txn last.at_ms)",
            &c.rolled_back,
        );
        row("manager reaches the host API again", &c.reachable);
        row("manager shows the host resynced", &c.resynced);
        row("dvs apply returned (rolled-back, exit 7)", &c.apply_wall);
        println!(
            "goal: restored and reachable ≤ timeout + 1 s = {}: p99 rolled back {}, reachable {} → {}",
            ms(c.goal_ms),
            ms(c.rolled_back.p99_ms),
            ms(c.reachable.p99_ms),
            if c.goal_met_p99 { "met" } else { "NOT met" }
        );
    }
    if let Some(d) = &r.down {
        println!(
            "\nmanager down {:.1} s with ping -i 0.01 between two hosts' host ports (through both switches and the fabric)",
            d.down_s
        );
        println!(
            "frames (echo requests) sent {}, replies received {}, lost {}  [{}]",
            d.frames_sent, d.frames_received, d.frames_lost, d.ping_summary
        );
        println!(
            "requests without a reply up to the last one answered (icmp_seq {}): {} (the rest of `lost` were in flight when ping was stopped)",
            d.last_replied_seq, d.lost_before_last_reply
        );
        for ((n, b), (_, a)) in d.drops_before.iter().zip(&d.drops_after) {
            println!("switch {n}: drops {b} before, {a} after");
        }
        for (n, rs) in &d.drop_reasons_after {
            if !rs.is_empty() {
                println!("  {n} nonzero drop counters: {rs}");
            }
        }
        println!(
            "manager started → answering {}; → online again (heartbeat after the restart): {}",
            ms(d.manager_start_ms),
            d.online_again_ms
                .iter()
                .map(|(n, t)| format!("{n} {}", ms(*t)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(c) = &r.commit {
        println!(
            "\ncommitted change → {} hosts (one namespace, loopback; canary then one wave); first revision: {} {}/{} in {} ms",
            c.hosts, c.first.outcome, c.first.committed, c.first.hosts, c.first.elapsed_ms
        );
        for (i, x) in c.changes.iter().enumerate() {
            println!(
                "  change {:>2}: revision {:>3} {} {}/{} committed, elapsed {} ms, wall {:.0} ms",
                i + 1,
                x.revision,
                x.outcome,
                x.committed,
                x.hosts,
                x.elapsed_ms,
                x.wall_ms
            );
        }
        head();
        row("apply → all committed (report elapsed_ms)", &c.elapsed);
        row("tandem dvs apply wall time", &c.wall);
        println!(
            "goal: p99 < 1 s with every host committed → {}",
            if c.goal_met_p99 { "met" } else { "NOT met" }
        );
    }
    let which: Vec<String> = o.which.iter().map(ToString::to_string).collect();
    println!(
        "\nreproduce: tandem bench dvs --which {} --runs {} --timeout-s {} --hosts {} --changes {} --down-s {}",
        which.join(","),
        o.runs,
        o.timeout_s,
        o.hosts,
        o.changes,
        o.down_s
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summaries_parse() {
        let out = "PING 10.232.0.12 (10.232.0.12) 56(84) bytes of data.\n\n--- 10.232.0.12 ping statistics ---\n7012 packets transmitted, 7010 received, 0.0285% packet loss, time 70123ms\n";
        assert_eq!(parse_ping(out), (7012, 7010));
        assert_eq!(parse_ping(""), (0, 0));
    }

    #[test]
    fn ping_gaps_ignore_the_tail_in_flight() {
        let out = "64 bytes from x: icmp_seq=1 ttl=64 time=0.1 ms\n64 bytes from x: icmp_seq=2 ttl=64 time=0.1 ms\n64 bytes from x: icmp_seq=4 ttl=64 time=0.1 ms\n";
        assert_eq!(ping_gaps(out), (4, 1));
        assert_eq!(ping_gaps(""), (0, 0));
    }

    #[test]
    fn drops_are_summed_with_their_reasons() {
        let st = serde_json::json!({"ports": [
            {"name": "up0", "counters": {"drops": {"vlan": 2, "gate": 0}}},
            {"name": "mgmt", "counters": {"drops": {"queue_full": 1}}}
        ]});
        let (t, r) = drops(&st);
        assert_eq!(t, 3);
        assert_eq!(
            r,
            vec!["up0:vlan=2".to_string(), "mgmt:queue_full=1".to_string()]
        );
    }

    #[test]
    fn documents_name_every_host() {
        let d = fabric_dvs_doc(20, &[("ha", "10.232.0.11"), ("hb", "10.232.0.12")]);
        assert!(d.contains("vlan = 20") && d.contains("name = \"hb\""));
        assert!(d.contains("10.232.0.11/24"));
        let c = commit_doc(&["h000".into(), "h001".into()], 101);
        assert!(c.contains("vlan = 101") && c.matches("[[host]]").count() == 2);
    }

    #[test]
    fn which_parses() {
        assert_eq!("cut".parse::<Which>(), Ok(Which::Cut));
        assert!("all".parse::<Which>().is_err());
    }
}
