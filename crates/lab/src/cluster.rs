//! The drill's cluster steps, run before the failover rounds on a topology
//! of their own (the rounds' sites are built fresh per round):
//!
//! 1. **join**: a `tandem-manager` in namespace M on the fabric (`tandem
//!    cluster init` into the step's work directory, then the daemon). Each
//!    host's tandemd starts with a management-only switch (a host port on
//!    the management port group, the fabric uplink a trunk whose native
//!    VLAN is management), joins with a single-use token (`tandem host
//!    join`, run in the host's namespace, so through its switch), and is
//!    restarted to serve the host API over mutual TLS. Checked: both hosts
//!    online in `tandem host list`, with an inventory and their host API.
//! 2. **commit**: `tandem dvs apply` of the distributed switch the drill
//!    runs (management, the trunk uplinks, and port group `vms`, which the
//!    guest needs and which only the distributed switch brings). Checked:
//!    exit 0, every host `committed`, nothing pending on either host, and
//!    the manager's digests are what the hosts run.
//! 3. **fan-out**: `tandem deploy` of an 8 MiB template from host-a to
//!    two clones on host-b, the link probed (1 MiB): the plan sends one
//!    image over the hosts' own link (each host serves its datastore on
//!    its end of it) and copies the second locally. Checked: done, the
//!    plan says so, the link's counter shows one image (beside the probe),
//!    not two, both clones have the template's SHA-256, no partial file.
//! 4. **rollback**: with the guest booted on A and a client writing to it,
//!    the management port group's VLAN 10 → 20 with `--timeout 5` and A as
//!    canary. Checked: exit 7, A rolls back by itself to the digest it ran
//!    before, B never sees a transaction, the manager shows A `resynced`
//!    and reaches its host API again, and the client saw no failure or
//!    outage ([`checker::check_service`]) and every reply it got is a
//!    record the guest knows ([`checker::check_vm`]).
//!
//! 5. **migrate**: with the client still writing, `tandem migrate drill
//!    --to host-b --copy-storage` as the operator, by host names (the
//!    manager says where each host API is): the guest's disk is copied
//!    over NBD while the client's fsync'd records land on it, then memory,
//!    over TLS with the hosts' certificates. Checked: the report says
//!    `done`, host-b runs the guest with the same UUID and its own copy of
//!    the disk, host-a has no VM left, the guest did not boot again and
//!    its counter goes on, the client saw no failure or outage and every
//!    reply it got is a record the guest (now on host-b) knows.
//!
//! 6. **host-killed**: the guest, now on host-b, is protected to host-a
//!    by the operator (`tandem protect --backup host-a@…`, mutual TLS over
//!    the hosts' replication link; protecting records the VM with the
//!    manager by itself), and host-b dies under the client's load: its
//!    tandemd and the guest's QEMU are killed at once. Checked: host-a
//!    takes over from its last commit, the guest did not boot again and
//!    its counter goes on, the manager's record names host-a one
//!    generation up, the client is served again within 15 s, and every
//!    reply it got is a record the guest (now on host-a) knows.
//!
//! The client path is the same switch and uplink the rounds use.
//!
//! Every wait is bounded in time; every `tandem` command runs under a
//! deadline (killed after). The namespaces are [`Topology`]'s, removed on
//! every exit path; the daemons stop before them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;

use crate::bounded::{run_bounded, CmdOut};
use crate::checker::{self, Delivered, Probe};
use crate::topology::{
    self, Topology, HOST_API_PORT, MANAGER_IP, MANAGER_PORT, MGMT_A, MGMT_B, REPL_A, REPL_B,
    UPLINK_A, UPLINK_B,
};

/// Where each joined host listens for replication, on its end of the
/// hosts' replication link.
const REPL_PORT: u16 = 7400;

/// The longest the client may go unanswered after a host dies: the
/// backup's takeover timeout, the in-place restore, the fabric learning
/// the guest's new port, and TCP's retransmission back-off on top.
const KILLED_HOST_GAP_MS: f64 = 15_000.0;
use crate::{block_on, boot_guest, exchange, tail, wait_for, DrillOptions, Host};

/// The management VLAN: the uplink trunk's native VLAN.
const MGMT_VLAN: u16 = 10;
/// Where the bad change moves the management port group: a VLAN the
/// uplink trunk does not carry.
const CUT_VLAN: u16 = 20;
/// The bad change's transaction timeout, the smallest the host accepts.
const CUT_TIMEOUT_S: u32 = 5;

/// The cluster's binaries (beside `tandem-lab`).
#[derive(Debug, Clone)]
pub struct ClusterBins {
    pub tandem: PathBuf,
    pub manager: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    Pass,
    Fail,
    /// An earlier step failed; this one needs what it would have set up.
    NotRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub what: String,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStep {
    pub step: u32,
    pub name: &'static str,
    pub status: StepStatus,
    pub elapsed_ms: f64,
    pub timings: Vec<Timing>,
    /// What was seen, for the report (not judged).
    pub observations: Vec<String>,
    pub violations: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub passed: bool,
    pub steps: Vec<ClusterStep>,
    /// What the client saw of the bad change (step 4), when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<checker::ServiceWindow>,
    /// Logs and documents kept after a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<PathBuf>,
}

impl ClusterStep {
    fn new(step: u32, name: &'static str) -> ClusterStep {
        ClusterStep {
            step,
            name,
            status: StepStatus::NotRun,
            elapsed_ms: 0.0,
            timings: Vec::new(),
            observations: Vec::new(),
            violations: Vec::new(),
        }
    }

    fn time(&mut self, what: &str, d: Duration) {
        self.timings.push(Timing {
            what: what.to_string(),
            ms: d.as_secs_f64() * 1e3,
        });
    }

    fn saw(&mut self, what: String) {
        self.observations.push(what);
    }

    /// Records a violated expectation; the step carries on checking.
    fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.violations.push(what());
        }
    }
}

const STEPS: [&str; 6] = [
    "join",
    "commit",
    "fan-out",
    "rollback",
    "migrate",
    "host-killed",
];

/// Where each joined host serves its datastore to the other, on its end of
/// the hosts' own link (so the fan-out's bytes are that link's counters).
const IMAGE_PORT: u16 = 7450;
/// The fan-out step's template.
const TEMPLATE_BYTES: usize = 8 << 20;
const PROBE_BYTES: u64 = 1 << 20;

/// Runs the cluster steps in order; a step that fails leaves the rest
/// not run (each builds on the previous one). An error is a setup failure
/// outside any step (the namespaces, say).
pub fn run(
    opts: &DrillOptions,
    bins: &ClusterBins,
    mut say: impl FnMut(&str),
) -> anyhow::Result<ClusterReport> {
    for (what, p) in [("tandem", &bins.tandem), ("tandem-manager", &bins.manager)] {
        if !p.is_file() {
            bail!(
                "{what} not found at {} (cargo build --release -p tandem-cli -p tandem-manager)",
                p.display()
            );
        }
    }
    let tag = format!("{}c", std::process::id() % 100_000);
    let work = opts.work_dir.join(format!("tdrill-{tag}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut steps: Vec<ClusterStep> = STEPS
        .iter()
        .enumerate()
        .map(|(i, n)| ClusterStep::new(i as u32 + 1, n))
        .collect();
    let mut service = None;
    {
        let mut lab = Lab::new(opts, bins, &tag, &work)?;
        for step in steps.iter_mut() {
            say(&format!("cluster step {}: {}", step.step, step.name));
            let t0 = Instant::now();
            let r = match step.step {
                1 => lab.join(step, &mut say),
                2 => lab.commit(step),
                3 => lab.fan_out(step, &mut say),
                4 => lab.rollback(step, &mut say).map(|w| service = Some(w)),
                5 => lab.migrate(step, &mut say),
                _ => lab.host_killed(step, &mut say),
            };
            if let Err(e) = r {
                step.violations.push(format!("{e:#}"));
            }
            step.elapsed_ms = t0.elapsed().as_secs_f64() * 1e3;
            step.status = if step.violations.is_empty() {
                StepStatus::Pass
            } else {
                StepStatus::Fail
            };
            say(&format!(
                "cluster step {}: {} {} ({:.1} s)",
                step.step,
                step.name,
                if step.status == StepStatus::Pass {
                    "PASS"
                } else {
                    "FAIL"
                },
                step.elapsed_ms / 1e3
            ));
            for v in &step.violations {
                say(&format!("  violation: {v}"));
            }
            if step.status == StepStatus::Fail {
                break;
            }
        }
        // `lab` drops here: hosts (and the guest), manager, namespaces.
    }
    let passed = steps.iter().all(|s| s.status == StepStatus::Pass);
    let evidence = if passed {
        let _ = std::fs::remove_dir_all(&work);
        None
    } else {
        say(&format!("cluster: evidence kept in {}", work.display()));
        Some(work)
    };
    Ok(ClusterReport {
        passed,
        steps,
        service,
        evidence,
    })
}

/// One drill host's place in the cluster.
struct Slot {
    /// The drill's name (`a`: state directory, socket, log).
    short: &'static str,
    /// Its certificate name in the cluster.
    name: &'static str,
    ns: String,
    uplink: &'static str,
    mgmt_ip: &'static str,
    /// Its end of the hosts' replication link.
    repl_ip: &'static str,
    /// `None` only while tandemd restarts (and once step 6 killed it).
    host: Option<Host>,
}

impl Slot {
    fn host(&self) -> anyhow::Result<&Host> {
        self.host
            .as_ref()
            .ok_or_else(|| anyhow!("{}: tandemd is not running", self.name))
    }

    /// `GET /v1/switch/txn` on the local socket: the switch's running
    /// digest, the pending transaction and the last that ended.
    fn txn(&self) -> anyhow::Result<Value> {
        Ok(block_on(self.host()?.api().get::<Value>("/v1/switch/txn"))?)
    }

    fn digest(&self) -> anyhow::Result<String> {
        let st = self.txn()?;
        st["running_digest"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{}: no running digest in {st}", self.name))
    }
}

struct Lab<'a> {
    // Field order is drop order: tandemds (and the guest) first, then the
    // manager, then the namespaces they all live in.
    hosts: [Slot; 2],
    manager: Option<Manager>,
    topo: Topology,
    mgr_ns: String,
    opts: &'a DrillOptions,
    bins: &'a ClusterBins,
    work: PathBuf,
    /// The revision step 2 committed and the txids it committed, by host.
    good_revision: Option<u64>,
    committed: [Option<String>; 2],
}

impl<'a> Lab<'a> {
    fn new(
        opts: &'a DrillOptions,
        bins: &'a ClusterBins,
        tag: &str,
        work: &Path,
    ) -> anyhow::Result<Lab<'a>> {
        let mut topo = Topology::create(tag).context("building the namespaces")?;
        let mgr_ns = topo.add_manager().context("the manager's namespace")?;
        let slot = |short, name, ns: &str, uplink, mgmt_ip, repl_ip| Slot {
            short,
            name,
            ns: ns.to_string(),
            uplink,
            mgmt_ip,
            repl_ip,
            host: None,
        };
        Ok(Lab {
            hosts: [
                slot("a", "host-a", &topo.a, UPLINK_A, MGMT_A, REPL_A),
                slot("b", "host-b", &topo.b, UPLINK_B, MGMT_B, REPL_B),
            ],
            manager: None,
            mgr_ns,
            topo,
            opts,
            bins,
            work: work.to_path_buf(),
            good_revision: None,
            committed: [None, None],
        })
    }

    fn addr() -> String {
        format!("{MANAGER_IP}:{MANAGER_PORT}")
    }

    fn operator(&self) -> PathBuf {
        self.work.join("manager/operator")
    }

    /// `tandem ARGS` as the cluster's operator, from the manager's
    /// namespace, within `timeout`.
    fn op(&self, args: &[&str], timeout: Duration) -> anyhow::Result<CmdOut> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.mgr_ns])
            .arg(&self.bins.tandem)
            .args(args)
            .arg("--identity")
            .arg(self.operator())
            .args(["--manager", &Self::addr()]);
        run_bounded(cmd, &self.work, timeout, &|| false)
    }

    /// `tandem --json ARGS` as the operator, required to succeed.
    fn op_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.op(&a, Duration::from_secs(20))?;
        if !out.status.success() {
            bail!("tandem {}: {}", args.join(" "), out.text());
        }
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("tandem {}: {}", args.join(" "), out.stdout))
    }

    fn manager_log(&self) -> String {
        tail(&self.work.join("manager.log"), 20)
    }

    /// The switch a drill host starts with: only what it takes to reach
    /// the manager. The guest's port group comes with the distributed
    /// switch (step 2).
    fn bootstrap_switch(s: &Slot) -> String {
        format!(
            "{}{}",
            shared_groups(MGMT_VLAN, false),
            host_ports(s, "[[uplink]]", "[[host_port]]")
        )
    }

    fn start_host(&mut self, i: usize, host_api: bool) -> anyhow::Result<()> {
        let s = &self.hosts[i];
        let doc = Self::bootstrap_switch(s);
        let listen = format!("0.0.0.0:{HOST_API_PORT}");
        let advertise = format!("{}:{HOST_API_PORT}", s.mgmt_ip);
        // Replication between joined hosts runs over their own link, by
        // mutual TLS with their certificates (step 6).
        let repl = format!("{}:{REPL_PORT}", s.repl_ip);
        // Deployments copy between the hosts over the same link.
        let images = format!("{}:{IMAGE_PORT}", s.repl_ip);
        let store = self.datastore(i);
        std::fs::create_dir_all(&store)?;
        let store = store.display().to_string();
        let extra: Vec<&str> = if host_api {
            vec![
                "--host-api",
                &listen,
                "--host-api-advertise",
                &advertise,
                "--repl-listen",
                &repl,
                "--image-listen",
                &images,
                "--datastore",
                &store,
            ]
        } else {
            Vec::new()
        };
        let h = Host::start_with_switch(s.short, &s.ns, &doc, self.opts, &self.work, &extra)
            .with_context(|| format!("starting {}'s tandemd", s.name))?;
        self.hosts[i].host = Some(h);
        Ok(())
    }

    fn start_manager(&mut self) -> anyhow::Result<()> {
        let state = self.work.join("manager");
        let addr = Self::addr();
        let mut init = Command::new(&self.bins.tandem);
        init.args(["cluster", "init", "--name", "drill", "--state-dir"])
            .arg(&state)
            .args(["--listen", &addr, "--advertise", &addr]);
        let out = run_bounded(init, &self.work, Duration::from_secs(30), &|| false)?;
        if !out.status.success() {
            bail!("tandem cluster init: {}", out.text());
        }
        let log = std::fs::File::create(self.work.join("manager.log"))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.mgr_ns])
            .arg(&self.bins.manager)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting tandem-manager")?;
        let ready = wait_for("tandem-manager answering", Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(anyhow!("tandem-manager exited ({st})")));
            }
            let out = self
                .op(&["cluster", "status"], Duration::from_secs(10))
                .ok()?;
            out.status.success().then_some(Ok(()))
        });
        // Kept (and so stopped on drop) whether or not it answered.
        self.manager = Some(Manager(child));
        ready
            .and_then(|r| r)
            .with_context(|| format!("manager log:\n{}", self.manager_log()))
    }

    /// Step 1: the manager, the hosts joined and serving the host API.
    fn join(&mut self, step: &mut ClusterStep, say: &mut impl FnMut(&str)) -> anyhow::Result<()> {
        let t = Instant::now();
        self.start_manager()?;
        step.time("manager init and start", t.elapsed());
        for i in 0..2 {
            self.start_host(i, false)?;
        }
        // The host's only way to the manager is its switch's host port and
        // uplink, which the switch sets up after tandemd answers.
        let t = Instant::now();
        for s in &self.hosts {
            let target = Self::addr();
            wait_for(
                &format!("{} reaching the manager through its switch", s.name),
                Duration::from_secs(20),
                || {
                    let target = target.clone();
                    topology::spawn_in_ns(&s.ns, move || {
                        let a: std::net::SocketAddr = target.parse().ok()?;
                        std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok()
                    })
                    .ok()?
                    .join()
                    .ok()?
                    .ok()?
                    .map(|_| ())
                },
            )?;
        }
        step.time("both management paths up", t.elapsed());
        for i in 0..2 {
            let (name, ns) = (self.hosts[i].name, self.hosts[i].ns.clone());
            let t = Instant::now();
            let token = self.op_json(&["token", "create", "--host", name])?["token"]
                .as_str()
                .ok_or_else(|| anyhow!("`token create` printed no token"))?
                .to_string();
            let state = self.hosts[i].host()?.state.clone();
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &ns])
                .arg(&self.bins.tandem)
                .args(["host", "join", &Self::addr(), "--token", &token])
                .args(["--name", name, "--timeout", "20s", "--state-dir"])
                .arg(&state);
            let out = run_bounded(cmd, &self.work, Duration::from_secs(30), &|| false)?;
            if !out.status.success() {
                bail!("{name}: tandem host join: {}", out.text());
            }
            // The token is single use: a second join with it must fail.
            let mut again = Command::new("ip");
            again
                .args(["netns", "exec", &ns])
                .arg(&self.bins.tandem)
                .args(["host", "join", &Self::addr(), "--token", &token])
                .args(["--name", name, "--timeout", "20s", "--force"])
                .arg("--state-dir")
                .arg(self.work.join(format!("rejoin-{name}")));
            let reused = run_bounded(again, &self.work, Duration::from_secs(30), &|| false)?;
            step.expect(!reused.status.success(), || {
                format!("{name}: the join token worked twice")
            });
            // tandemd takes the identity (and serves the host API) at start.
            let t_restart = Instant::now();
            drop(self.hosts[i].host.take());
            self.start_host(i, true)?;
            step.time(&format!("{name}: token and join"), t_restart - t);
            step.time(&format!("{name}: tandemd restart"), t_restart.elapsed());
        }
        say("  both hosts joined; waiting for them online with an inventory");
        let t = Instant::now();
        let want: Vec<(&str, String)> = self
            .hosts
            .iter()
            .map(|s| (s.name, format!("{}:{HOST_API_PORT}", s.mgmt_ip)))
            .collect();
        let mut last = Value::Null;
        let listed = wait_for(
            "both hosts online with an inventory and their host API",
            Duration::from_secs(40),
            || {
                let v = self.op_json(&["host", "list"]).ok()?;
                let ok = want.iter().all(|(name, api)| {
                    host_in(&v, name).is_some_and(|h| {
                        h["connection"] == "online"
                            && h["inventory"].is_object()
                            && h["host_api"] == api.as_str()
                    })
                });
                last = v.clone();
                ok.then_some(v)
            },
        )
        .with_context(|| {
            format!(
                "last `host list`: {last}\nmanager log:\n{}",
                self.manager_log()
            )
        })?;
        step.time("joined → both online with an inventory", t.elapsed());
        for (name, _) in &want {
            let Some(h) = host_in(&listed, name) else {
                continue;
            };
            let inv = &h["inventory"];
            let groups: Vec<&str> = inv["port_groups"]
                .as_array()
                .map(|g| g.iter().filter_map(|g| g["name"].as_str()).collect())
                .unwrap_or_default();
            let uplinks: Vec<&str> = inv["uplinks"]
                .as_array()
                .map(|u| u.iter().filter_map(|u| u["name"].as_str()).collect())
                .unwrap_or_default();
            step.expect(groups.contains(&"mgmt"), || {
                format!("{name}: the inventory lacks port group mgmt: {inv}")
            });
            step.saw(format!(
                "{name}: online, host API {}, inventory: port groups {groups:?}, uplinks {uplinks:?}",
                h["host_api"].as_str().unwrap_or("?")
            ));
        }
        Ok(())
    }

    /// A host's datastore: where deployments copy to and serve from.
    fn datastore(&self, i: usize) -> PathBuf {
        self.work.join(format!("{}-datastore", self.hosts[i].short))
    }

    /// Step 3: a small fan-out, host-a's template to two clones on
    /// host-b. The plan (link probed) sends one image over the hosts' own
    /// link and makes the second clone locally; checked: the deployment
    /// is done, the plan says so, the link carried one image (and the
    /// probe), not two, and both clones have the template's SHA-256, with
    /// no partial file left.
    fn fan_out(
        &mut self,
        step: &mut ClusterStep,
        say: &mut impl FnMut(&str),
    ) -> anyhow::Result<()> {
        let (a, b) = (self.hosts[0].name, self.hosts[1].name);
        let (a_store, b_store) = (self.datastore(0), self.datastore(1));
        let template = a_store.join("drill-template.img");
        {
            // Incompressible: xorshift, seeded by the pid.
            let mut x = u64::from(std::process::id()) | 1;
            let mut bytes = vec![0u8; TEMPLATE_BYTES];
            for chunk in bytes.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            std::fs::write(&template, bytes)?;
        }
        let digest = sha256_of(&template)?;
        let sent_before = tx_bytes(&self.hosts[0].ns, "a-repl")?;
        let t = Instant::now();
        let probe = PROBE_BYTES.to_string();
        let out = self.op(
            &[
                "--json",
                "deploy",
                "drill-template.img",
                "--from",
                a,
                "--hosts",
                b,
                "--per-host",
                "2",
                "--probe-bytes",
                &probe,
            ],
            Duration::from_secs(120),
        )?;
        step.time("deploy 2 clones", t.elapsed());
        if !out.status.success() {
            bail!("tandem deploy: {}", out.text());
        }
        let view: Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("tandem deploy printed no view: {}", out.stdout))?;
        step.expect(view["state"] == "done", || format!("deployment: {view}"));
        let plan = view["plan_text"].as_str().unwrap_or_default();
        step.expect(
            plan.contains(&format!("network copy {a}"))
                && plan.contains(&format!("local copy on {b}")),
            || {
                format!(
                    "the plan is not one network copy and one local copy:
{plan}"
                )
            },
        );
        let sent = tx_bytes(&self.hosts[0].ns, "a-repl")? - sent_before;
        let image = TEMPLATE_BYTES as f64;
        let images = (sent as f64 - PROBE_BYTES as f64) / image;
        step.saw(format!(
            "{a} -> {b} link carried {sent} bytes: {images:.3} images beside the probe"
        ));
        step.expect((0.95..=1.15).contains(&images), || {
            format!("the link carried {images:.3} images; the plan sends one")
        });
        let mut clones = Vec::new();
        for e in std::fs::read_dir(&b_store)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            step.expect(!name.ends_with(".partial"), || format!("{b}: {name} left"));
            if name.starts_with("drill-template-") {
                clones.push(name);
            }
        }
        clones.sort();
        step.expect(clones.len() == 2, || format!("{b} has clones {clones:?}"));
        for c in &clones {
            let d = sha256_of(&b_store.join(c))?;
            step.expect(d == digest, || {
                format!("{b}:{c} has sha256 {d}, not {digest}")
            });
        }
        say(&format!(
            "  {} → {}: 2 clones, {images:.2} images over the link, {:.1} s",
            a,
            b,
            view["elapsed_s"].as_f64().unwrap_or(0.0)
        ));
        Ok(())
    }

    /// Step 2: the distributed switch the drill runs, committed on both.
    fn commit(&mut self, step: &mut ClusterStep) -> anyhow::Result<()> {
        let doc = self.dvs_doc(MGMT_VLAN);
        let t = Instant::now();
        let (code, r) = self.dvs_apply("dvs-good.toml", &doc, 30, Duration::from_secs(120))?;
        step.time("dvs apply (canary, then the wave)", t.elapsed());
        step.expect(code == 0, || format!("dvs apply exited {code}: {r}"));
        step.expect(r["outcome"] == "completed", || {
            format!("outcome {} (want completed)", r["outcome"])
        });
        self.good_revision = r["revision"].as_u64();
        step.saw(format!("revision {}: {}", r["revision"], outcomes(&r)));
        let shown = self.op_json(&["dvs", "show"])?;
        for i in 0..2 {
            let name = self.hosts[i].name;
            let o = host_in(&r, name).cloned().unwrap_or(Value::Null);
            step.expect(o["result"] == "committed", || {
                format!("{name}: result {} (want committed)", o["result"])
            });
            let st = self.hosts[i].txn()?;
            step.expect(st["pending"].is_null(), || {
                format!("{name}: still pending on the host: {st}")
            });
            step.expect(
                st["last"]["outcome"] == "committed" && st["last"]["txid"] == o["txid"],
                || format!("{name}: the host's last transaction is {}", st["last"]),
            );
            let pending_file = self.hosts[i].host()?.state.join("switch.pending.json");
            step.expect(!pending_file.exists(), || {
                format!("{name}: {} is still there", pending_file.display())
            });
            let v = host_in(&shown, name).cloned().unwrap_or(Value::Null);
            step.expect(
                v["state"] == "in-sync" && v["digest"] == st["running_digest"],
                || {
                    format!(
                        "{name}: the manager shows {v}, the host runs {}",
                        st["running_digest"]
                    )
                },
            );
            self.committed[i] = o["txid"].as_str().map(str::to_string);
        }
        Ok(())
    }

    /// Step 4: a change that cuts the canary off the manager, while the
    /// guest serves a client; the canary must restore itself.
    fn rollback(
        &mut self,
        step: &mut ClusterStep,
        say: &mut impl FnMut(&str),
    ) -> anyhow::Result<checker::ServiceWindow> {
        let good = self
            .good_revision
            .ok_or_else(|| anyhow!("step 2 gave no revision"))?;
        let t = Instant::now();
        boot_guest(self.hosts[0].host()?, self.opts, &self.work)
            .context("booting the guest on host A")?;
        step.time(
            "guest boot on host-a (port group vms from the distributed switch)",
            t.elapsed(),
        );
        let probe = ProbeClient::start_served(&self.topo)?;
        let before = [self.hosts[0].digest()?, self.hosts[1].digest()?];
        let b_last = self.hosts[1].txn()?["last"].clone();
        say(&format!(
            "  guest serving; management VLAN {MGMT_VLAN} -> {CUT_VLAN} on host-a (canary), --timeout {CUT_TIMEOUT_S}"
        ));

        let doc = self.dvs_doc(CUT_VLAN);
        let t0 = Instant::now();
        let (code, r, applied, watch) = std::thread::scope(|sc| -> anyhow::Result<_> {
            let apply = sc.spawn(|| {
                let r =
                    self.dvs_apply("dvs-cut.toml", &doc, CUT_TIMEOUT_S, Duration::from_secs(90));
                r.map(|(code, v)| (code, v, t0.elapsed()))
            });
            let watch = self.watch_canary(t0, &before[0]);
            let (code, r, applied) = apply
                .join()
                .map_err(|_| anyhow!("the apply thread panicked"))??;
            Ok((code, r, applied, watch))
        })?;
        let (code, r, applied, watch) = (code, r, applied, watch?);
        step.time("bad dvs apply → pending on host-a", watch.pending);
        match watch.cut {
            Some(d) => step.time(
                "bad dvs apply → the manager's namespace cut off from host-a",
                d,
            ),
            None => step.violations.push(
                "the change never cut the manager off host-a: its host API answered throughout"
                    .to_string(),
            ),
        }
        step.time(
            "bad dvs apply → `dvs apply` returned (exit 7 expected)",
            applied,
        );
        step.time("bad dvs apply → host-a restored by itself", watch.restored);
        step.expect(code == 7, || {
            format!("dvs apply exited {code} (want 7): {r}")
        });
        step.expect(r["outcome"] != "completed", || {
            format!("reported completed: {r}")
        });
        step.expect(r["current_revision"].as_u64() == Some(good), || {
            format!(
                "the current revision is {} (want {good})",
                r["current_revision"]
            )
        });
        step.saw(format!(
            "dvs apply: exit {code}, outcome {}, {}",
            r["outcome"],
            outcomes(&r)
        ));
        let a_out = host_in(&r, "host-a").cloned().unwrap_or(Value::Null);
        step.expect(a_out["result"] != "committed", || {
            format!("host-a: result committed: {r}")
        });
        step.expect(
            watch.ended["txid"] == a_out["txid"] && watch.ended["outcome"] == "rolled-back",
            || {
                format!(
                    "host-a's last transaction is {} (want {} rolled-back)",
                    watch.ended, a_out["txid"]
                )
            },
        );
        step.expect(watch.digest == before[0], || {
            format!(
                "host-a runs {} after the rollback, {} before",
                watch.digest, before[0]
            )
        });
        // B: skipped by the manager, and never a transaction of its own.
        let b_out = host_in(&r, "host-b").cloned().unwrap_or(Value::Null);
        step.expect(b_out["result"] == "skipped", || {
            format!("host-b: result {} (want skipped)", b_out["result"])
        });
        step.expect(!watch.b_pending_seen, || {
            "host-b had a transaction pending during the change".to_string()
        });
        let b_now = self.hosts[1].txn()?;
        step.expect(
            b_now["running_digest"] == before[1].as_str() && b_now["last"] == b_last,
            || {
                format!(
                    "host-b changed: runs {}, last {} (before: {}, last {b_last})",
                    b_now["running_digest"], b_now["last"], before[1]
                )
            },
        );

        // The manager: host-a resynced at the good revision, reachable.
        let mut seen = Value::Null;
        let resynced = wait_for(
            "the manager showing host-a resynced",
            Duration::from_secs(30),
            || {
                let v = self.op_json(&["dvs", "show"]).ok()?;
                let h = host_in(&v, "host-a")?.clone();
                seen = h.clone();
                (h["state"] == "resynced" && h["revision"].as_u64() == Some(good))
                    .then(|| t0.elapsed())
            },
        )
        .with_context(|| format!("last seen: {seen}\nmanager log:\n{}", self.manager_log()));
        let window_end = match resynced {
            Ok(d) => {
                step.time("bad dvs apply → the manager shows host-a resynced", d);
                d
            }
            Err(e) => {
                step.violations.push(format!("{e:#}"));
                t0.elapsed()
            }
        };
        // The operator's own view of the host API, as the manager dials it.
        let mut remote = Command::new("ip");
        remote
            .args(["netns", "exec", &self.mgr_ns])
            .arg(&self.bins.tandem)
            .arg("--remote")
            .arg(format!("host-a@{MGMT_A}:{HOST_API_PORT}"))
            .arg("--remote-identity")
            .arg(self.operator())
            .args(["switch", "txn"]);
        let reach = run_bounded(remote, &self.work, Duration::from_secs(20), &|| false)?;
        step.expect(reach.status.success(), || {
            format!(
                "the manager's namespace cannot reach host-a's API after the rollback: {}",
                reach.text()
            )
        });

        // What the client saw.
        let w = self.judge_client(step, probe, t0, window_end, "the change")?;
        Ok(w)
    }

    /// Stops the client and judges what it saw during `what` (from the
    /// start of the step to `window_end`): no failed request and no
    /// outage (`checker::check_service`), and every reply a record the
    /// guest knows (`verify_records`).
    fn judge_client(
        &self,
        step: &mut ClusterStep,
        probe: ProbeClient,
        t0: Instant,
        window_end: Duration,
        what: &str,
    ) -> anyhow::Result<checker::ServiceWindow> {
        let (probes, delivered) = probe.stop(t0)?;
        let w = checker::service_window(&probes, 0.0, window_end.as_secs_f64() * 1e3);
        step.saw(format!(
            "client during {what} ({:.1} s): {} replies, {} failed, latency p50 {:.1} ms max {:.1} ms, longest gap {:.0} ms (before: {} replies, p50 {:.1} ms, max {:.1} ms)",
            window_end.as_secs_f64(),
            w.during_answered,
            w.during_failed,
            w.during_p50_ms,
            w.during_max_ms,
            w.during_longest_gap_ms,
            w.before_answered,
            w.before_p50_ms,
            w.before_max_ms
        ));
        step.violations.extend(checker::check_service(&w));
        let known = verify_records(&self.topo, &delivered)?;
        step.violations
            .extend(known.iter().map(|v| format!("client: {v}")));
        Ok(w)
    }

    /// Step 5: the guest moves from host-a to host-b under the client's
    /// load, its disk copied while the client's records land on it.
    fn migrate(
        &mut self,
        step: &mut ClusterStep,
        say: &mut impl FnMut(&str),
    ) -> anyhow::Result<()> {
        let a = self.hosts[0].host()?;
        let b = self.hosts[1].host()?;
        let info: tandem_api::VmInfo = block_on(a.api().get("/v1/vms/drill"))
            .context("the guest on host-a before the migration")?;
        let console_a: tandem_api::ConsoleChunk =
            block_on(a.api().get("/v1/vms/drill/console?offset=0"))?;
        let tick_before = last_tick(&console_a.data).unwrap_or(0);
        let probe = ProbeClient::start_served(&self.topo)?;
        say("  migrating the guest host-a -> host-b under the client's load (disk copied)");
        let t0 = Instant::now();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.mgr_ns])
            .arg(&self.bins.tandem)
            .args(["--remote", "host-a", "--remote-identity"])
            .arg(self.operator())
            .args([
                "--json",
                "migrate",
                "drill",
                "--to",
                "host-b",
                "--copy-storage",
            ]);
        let out = run_bounded(cmd, &self.work, Duration::from_secs(240), &|| false)?;
        let took = t0.elapsed();
        step.time("tandem migrate (disk, then memory)", took);
        // A little of the client on host-b after the move.
        let settle = Instant::now();
        wait_for(
            "the client's replies from host-b",
            Duration::from_secs(30),
            || {
                let n = probe
                    .shared
                    .samples
                    .lock()
                    .iter()
                    .filter(|p| p.ok && p.at_ms > (t0 + took - probe.started).as_secs_f64() * 1e3)
                    .count();
                (n >= 10).then_some(())
            },
        )
        .ok();
        let window_end = took + settle.elapsed();
        let report: Value = out
            .stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        step.expect(out.status.success() && report["phase"] == "done", || {
            format!("tandem migrate: {}", out.text())
        });
        step.saw(format!(
            "migration: {:.1} s, disk {} MiB copied in {} ms, memory {} MiB, downtime {} ms, rung {}",
            report["elapsed_ms"].as_f64().unwrap_or(0.0) / 1e3,
            report["storage_bytes"].as_u64().unwrap_or(0) >> 20,
            report["storage_ms"],
            report["transferred"].as_u64().unwrap_or(0) >> 20,
            report["downtime_ms"],
            report["rung"]
        ));
        if let Some(d) = report["downtime_ms"].as_f64() {
            step.time("QEMU's downtime", Duration::from_secs_f64(d / 1e3));
        }
        let moved: Result<tandem_api::VmInfo, _> = block_on(b.api().get("/v1/vms/drill"));
        match &moved {
            Ok(m) => {
                step.expect(m.state == tandem_api::VmState::Running, || {
                    format!("host-b: the guest is {}", m.state)
                });
                step.expect(m.uuid == info.uuid, || {
                    format!("host-b: uuid {} (host-a had {})", m.uuid, info.uuid)
                });
                step.expect(m.spec_toml.contains("/disks/data.qcow2"), || {
                    format!(
                        "host-b does not run its own copy of the disk:\n{}",
                        m.spec_toml
                    )
                });
            }
            Err(e) => step.violations.push(format!("host-b has no guest: {e}")),
        }
        let left: Vec<tandem_api::VmSummary> = block_on(a.api().get("/v1/vms")).unwrap_or_default();
        step.expect(left.is_empty(), || {
            format!(
                "host-a still has VMs: {:?}",
                left.iter().map(|v| &v.name).collect::<Vec<_>>()
            )
        });
        if moved.is_ok() {
            let counting = counting_past(b, "host-b", tick_before + 1);
            match counting {
                Ok(t) => step.saw(format!(
                    "guest counter: {tick_before} on host-a, {t} on host-b, no reboot"
                )),
                Err(e) => step.violations.push(format!("{e:#}")),
            }
        }
        self.judge_client(step, probe, t0, window_end, "the migration")?;
        Ok(())
    }

    /// Follows host-a's (and host-b's) transaction on the local sockets
    /// from the bad apply until host-a has ended it.
    /// Step 6: the guest, now on host-b, is protected to host-a over the
    /// hosts' replication link (mutual TLS; protecting records the VM with
    /// the manager by itself), and host-b dies under the client's load:
    /// its tandemd and the guest's QEMU are killed at once. host-a takes
    /// the guest over from its last commit.
    fn host_killed(
        &mut self,
        step: &mut ClusterStep,
        say: &mut impl FnMut(&str),
    ) -> anyhow::Result<()> {
        let b = self.hosts[1].host()?;
        let info: tandem_api::VmInfo = block_on(b.api().get("/v1/vms/drill"))
            .context("the guest on host-b before the kill")?;
        say("  protecting the guest on host-b to host-a (mutual TLS, by certificate name)");
        let t = Instant::now();
        let backup = format!("host-a@{REPL_A}:{REPL_PORT}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.mgr_ns])
            .arg(&self.bins.tandem)
            .args(["--remote", "host-b", "--remote-identity"])
            .arg(self.operator())
            .args(["protect", "drill", "--backup", &backup, "--epoch-ms", "100"]);
        let out = run_bounded(cmd, &self.work, Duration::from_secs(60), &|| false)?;
        if !out.status.success() {
            bail!("tandem protect drill on host-b: {}", out.text());
        }
        let a = self.hosts[0].host()?;
        let protected = wait_for(
            "the guest protected on host-b",
            Duration::from_secs(120),
            || {
                let st: Vec<tandem_api::FtStatus> = block_on(b.api().get("/v1/ft/drill")).ok()?;
                st.into_iter()
                    .find(|s| s.state == tandem_api::FtState::Protected && s.last_committed >= 3)
            },
        );
        let standby = wait_for("host-a standing by", Duration::from_secs(30), || {
            let st: Vec<tandem_api::FtStatus> = block_on(a.api().get("/v1/ft/drill")).ok()?;
            st.into_iter()
                .find(|s| s.state == tandem_api::FtState::Standby)
        });
        let (protected, _) = match (protected, standby) {
            (Ok(p), Ok(s)) => (p, s),
            (p, s) => {
                step.violations.extend(
                    [p.err(), s.err()]
                        .into_iter()
                        .flatten()
                        .map(|e| format!("{e:#}")),
                );
                return Ok(());
            }
        };
        step.time("protect until host-a stands by", t.elapsed());
        let record = self.op_json(&["cluster", "vms"])?;
        let rec = record
            .as_array()
            .and_then(|v| v.iter().find(|r| r["uuid"] == info.uuid.as_str()))
            .cloned()
            .unwrap_or(Value::Null);
        step.expect(
            rec["primary"] == "host-b" && rec["backup"] == "host-a",
            || format!("the manager's record after protect: {rec}"),
        );
        let generation = rec["generation"].as_u64().unwrap_or(0);

        let console: tandem_api::ConsoleChunk =
            block_on(b.api().get("/v1/vms/drill/console?offset=0"))?;
        let tick_before = last_tick(&console.data).unwrap_or(0);
        let probe = ProbeClient::start_served(&self.topo)?;
        say("  killing host-b (its tandemd and the guest's QEMU) under the client's load");
        let t0 = Instant::now();
        let qemu = info.pid;
        if let Some(h) = self.hosts[1].host.as_mut() {
            h.kill();
        }
        if let Some(pid) = qemu {
            let _ = signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        self.hosts[1].host = None;
        let a = self.hosts[0].host()?;
        let took_over = wait_for("host-a running the guest", Duration::from_secs(60), || {
            let st: Vec<tandem_api::FtStatus> = block_on(a.api().get("/v1/ft/drill")).ok()?;
            st.into_iter()
                .find(|s| s.state == tandem_api::FtState::FailedOver)
        });
        let resumed = took_over.is_ok();
        match took_over {
            Ok(st) => step.saw(format!(
                "host-a took over {:.1} s after the kill, from epoch {} (host-b had committed {} when protected): {}",
                t0.elapsed().as_secs_f64(),
                st.failover.as_ref().map_or(0, |f| f.epoch),
                protected.last_committed,
                st.failover.as_ref().map_or_else(String::new, |f| f.reason.clone())
            )),
            Err(e) => step.violations.push(format!("{e:#}")),
        }
        if resumed {
            let counting = counting_past(a, "host-a", tick_before);
            match counting {
                Ok(t) => step.saw(format!(
                    "guest counter: {tick_before} on host-b before the kill, {t} on host-a, no reboot"
                )),
                Err(e) => step.violations.push(format!("{e:#}")),
            }
            let moved = wait_for(
                "the manager's record naming host-a",
                Duration::from_secs(30),
                || {
                    let v = self.op_json(&["cluster", "vms"]).ok()?;
                    v.as_array()?
                        .iter()
                        .find(|r| r["uuid"] == info.uuid.as_str() && r["primary"] == "host-a")
                        .cloned()
                },
            );
            match moved {
                Ok(r) => step.expect(r["generation"].as_u64() == Some(generation + 1), || {
                    format!(
                        "the record after the takeover: {r} (it was at generation {generation})"
                    )
                }),
                Err(e) => step.violations.push(format!("{e:#}")),
            }
            // A little of the client on host-a after the takeover.
            let since = t0.elapsed().as_secs_f64() * 1e3;
            let _ = wait_for(
                "the client's replies from host-a",
                Duration::from_secs(30),
                || {
                    let n = probe
                        .shared
                        .samples
                        .lock()
                        .iter()
                        .filter(|p| {
                            p.ok && p.at_ms > (t0 - probe.started).as_secs_f64() * 1e3 + since
                        })
                        .count();
                    (n >= 10).then_some(())
                },
            );
        }
        // A host dying is an outage until the takeover: requests may fail
        // meanwhile. What must hold is that every reply the client got is
        // a record the guest (now on host-a) knows, and that it is served
        // again.
        let window_end = t0.elapsed();
        let (probes, delivered) = probe.stop(t0)?;
        let w = checker::service_window(&probes, 0.0, window_end.as_secs_f64() * 1e3);
        step.saw(format!(
            "client from the kill ({:.1} s): {} replies, {} failed, longest gap {:.0} ms",
            window_end.as_secs_f64(),
            w.during_answered,
            w.during_failed,
            w.during_longest_gap_ms,
        ));
        step.expect(w.during_answered > 0, || {
            "the guest answered nothing after the kill".to_string()
        });
        step.expect(w.during_longest_gap_ms <= KILLED_HOST_GAP_MS, || {
            format!(
                "the guest answered nothing for {:.0} ms after host-b died (allowed: {KILLED_HOST_GAP_MS:.0} ms)",
                w.during_longest_gap_ms
            )
        });
        if resumed {
            let known = verify_records(&self.topo, &delivered)?;
            step.violations
                .extend(known.iter().map(|v| format!("client: {v}")));
        }
        Ok(())
    }

    fn watch_canary(&self, t0: Instant, before: &str) -> anyhow::Result<Watch> {
        let mut pending: Option<Duration> = None;
        let mut b_pending_seen = false;
        let mut cut: Option<Duration> = None;
        let deadline = t0 + Duration::from_secs(60);
        loop {
            let a = self.hosts[0].txn()?;
            if let Ok(b) = self.hosts[1].txn() {
                b_pending_seen |= !b["pending"].is_null();
            }
            if !a["pending"].is_null() {
                pending.get_or_insert(t0.elapsed());
                // When the attempt that failed began (not its timeout).
                let tried = t0.elapsed();
                if cut.is_none() && !self.manager_reaches(MGMT_A) {
                    cut = Some(tried);
                }
            } else if let Some(p) = pending {
                return Ok(Watch {
                    pending: p,
                    restored: t0.elapsed(),
                    ended: a["last"].clone(),
                    digest: a["running_digest"].as_str().unwrap_or_default().to_string(),
                    b_pending_seen,
                    cut,
                });
            }
            if Instant::now() > deadline {
                bail!(
                    "host-a: {} within 60 s of the bad apply (it ran {before}): {a}",
                    if pending.is_some() {
                        "the change was not rolled back"
                    } else {
                        "no transaction seen"
                    }
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a TCP connection from the manager's namespace to the host
    /// API at `ip` opens (within 300 ms: on the management network an
    /// answer takes a millisecond; a cut host drops the SYN).
    fn manager_reaches(&self, ip: &str) -> bool {
        let addr = format!("{ip}:{HOST_API_PORT}");
        topology::spawn_in_ns(&self.mgr_ns, move || {
            addr.parse::<std::net::SocketAddr>().is_ok_and(|a| {
                std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok()
            })
        })
        .ok()
        .and_then(|h| h.join().ok())
        .and_then(Result::ok)
        // Could not even try: count it as reachable, so it proves no cut.
        .unwrap_or(true)
    }

    /// The drill's distributed switch with the management port group on
    /// `mgmt_vlan`.
    fn dvs_doc(&self, mgmt_vlan: u16) -> String {
        let mut d = shared_groups(mgmt_vlan, true);
        for s in &self.hosts {
            d.push_str(&format!("\n[[host]]\nname = \"{}\"\n", s.name));
            d.push_str(&host_ports(s, "[[host.uplink]]", "[[host.host_port]]"));
        }
        d
    }

    /// `tandem --json dvs apply FILE --timeout S --canary host-a`: its exit
    /// code and report.
    fn dvs_apply(
        &self,
        file: &str,
        doc: &str,
        timeout_s: u32,
        bound: Duration,
    ) -> anyhow::Result<(i32, Value)> {
        let f = self.work.join(file);
        std::fs::write(&f, doc)?;
        let t = timeout_s.to_string();
        let out = self.op(
            &[
                "--json",
                "dvs",
                "apply",
                &f.to_string_lossy(),
                "--timeout",
                &t,
                "--canary",
                "host-a",
            ],
            bound,
        )?;
        let report = serde_json::from_str(&out.stdout).with_context(|| {
            format!(
                "dvs apply printed no report: {}\nmanager log:\n{}",
                out.text(),
                self.manager_log()
            )
        })?;
        Ok((out.status.code().unwrap_or(-1), report))
    }
}

/// What host-a did with the bad change, seen from its local socket.
struct Watch {
    /// From the apply to the transaction pending on host-a.
    pending: Duration,
    /// From the apply to nothing pending again.
    restored: Duration,
    /// The host's record of the transaction that ended.
    ended: Value,
    /// What it runs then.
    digest: String,
    b_pending_seen: bool,
    /// From the apply to a connection from the manager's namespace to
    /// host-a's API failing: the cut is real.
    cut: Option<Duration>,
}

/// Port groups every host has: management on `mgmt_vlan`, the uplink
/// trunk (management VLAN native, untagged on the fabric), and with
/// `vms` the guest's group, on the native VLAN too because the fabric's
/// client has no 802.1Q.
fn shared_groups(mgmt_vlan: u16, vms: bool) -> String {
    let mut d = format!(
        "[[port_group]]\nname = \"mgmt\"\nvlan = {mgmt_vlan}\n\n[[port_group]]\nname = \"trunk\"\nvlan_mode = \"trunk\"\nnative_vlan = {MGMT_VLAN}\nallowed_vlans = [30]\n"
    );
    if vms {
        d.push_str(&format!(
            "\n[[port_group]]\nname = \"vms\"\nvlan = {MGMT_VLAN}\n"
        ));
    }
    d
}

/// A host's uplink and management host port, under the given table names
/// (a host's own document, or its part of the distributed one).
fn host_ports(s: &Slot, uplink: &str, host_port: &str) -> String {
    format!(
        "\n{uplink}\nname = \"fabric\"\ninterfaces = [\"{}\"]\nport_group = \"trunk\"\n\n{host_port}\nname = \"mgmt\"\ntap = \"mgmt0\"\nport_group = \"mgmt\"\naddresses = [\"{}/24\"]\n",
        s.uplink, s.mgmt_ip
    )
}

/// The entry for `name` in a list of hosts (`host list`) or in a report's
/// or view's `hosts` (`dvs apply`, `dvs show`).
fn host_in<'v>(v: &'v Value, name: &str) -> Option<&'v Value> {
    let list = v.get("hosts").unwrap_or(v).as_array()?;
    list.iter().find(|h| h["host"] == name || h["name"] == name)
}

/// `host-a committed, host-b skipped` from a `dvs apply` report.
fn outcomes(r: &Value) -> String {
    r["hosts"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    format!(
                        "{} {}",
                        h["host"].as_str().unwrap_or("?"),
                        h["result"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// The manager; stopped (SIGTERM, then SIGKILL) when dropped.
struct Manager(Child);

impl Drop for Manager {
    fn drop(&mut self) {
        // The tandem-manager this drill started; already gone is fine.
        let _ = signal::kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct ProbeShared {
    stop: AtomicBool,
    /// Answer times are in ms from `started`.
    samples: Mutex<Vec<Probe>>,
    delivered: Mutex<Vec<Delivered>>,
}

/// A client in the client namespace writing numbered records to the
/// guest, one connection per request, and timing each.
struct ProbeClient {
    shared: Arc<ProbeShared>,
    started: Instant,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl ProbeClient {
    /// Starts the client and waits (60 s at most) until the guest has
    /// answered it ten times.
    fn start_served(topo: &Topology) -> anyhow::Result<ProbeClient> {
        let probe = ProbeClient::start(topo)?;
        wait_for(
            "the client's first replies",
            Duration::from_secs(60),
            || (probe.shared.samples.lock().iter().filter(|p| p.ok).count() >= 10).then_some(()),
        )
        .with_context(|| format!("the client: {:?}", probe.shared.samples.lock().last()))?;
        Ok(probe)
    }

    fn start(topo: &Topology) -> anyhow::Result<ProbeClient> {
        let shared = Arc::new(ProbeShared::default());
        let started = Instant::now();
        let thread = {
            let shared = shared.clone();
            topology::spawn_in_ns(&topo.c, move || {
                let mut n = 0u64;
                // Bounded even if nobody stops it.
                while !shared.stop.load(Ordering::SeqCst)
                    && started.elapsed() < Duration::from_secs(300)
                {
                    n += 1;
                    let text = format!("cluster-{n}");
                    let sent = Instant::now();
                    let r = exchange(&format!("PUT {text}"), Duration::from_secs(5));
                    let seq = r
                        .as_ref()
                        .ok()
                        .and_then(|l| l.strip_prefix("OK "))
                        .and_then(|s| s.parse::<u64>().ok());
                    shared.samples.lock().push(Probe {
                        at_ms: started.elapsed().as_secs_f64() * 1e3,
                        latency_ms: sent.elapsed().as_secs_f64() * 1e3,
                        ok: seq.is_some(),
                    });
                    match seq {
                        Some(seq) => shared.delivered.lock().push(Delivered { seq, text }),
                        // Paced so a dead path is not a busy loop.
                        None => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })?
        };
        Ok(ProbeClient {
            shared,
            started,
            thread,
        })
    }

    /// Stops the client: its probes with times relative to `t0`, and the
    /// replies it got.
    fn stop(self, t0: Instant) -> anyhow::Result<(Vec<Probe>, Vec<Delivered>)> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow!("the client thread panicked"))??;
        let shift = t0.saturating_duration_since(self.started).as_secs_f64() * 1e3;
        let probes = self
            .shared
            .samples
            .lock()
            .iter()
            .map(|p| Probe {
                at_ms: p.at_ms - shift,
                ..*p
            })
            .collect();
        let delivered = self.shared.delivered.lock().clone();
        Ok((probes, delivered))
    }
}

/// The guest's last `tandem-guest: tick N` on a console.
/// A file's SHA-256 (hex), by `sha256sum`.
fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    if !out.status.success() {
        bail!(
            "sha256sum {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Bytes `dev` in namespace `ns` has sent.
fn tx_bytes(ns: &str, dev: &str) -> anyhow::Result<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{dev}/statistics/tx_bytes"))
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("{dev} in {ns}: no tx_bytes"))
}

fn last_tick(console: &str) -> Option<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tandem-guest: tick "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
}

/// Waits (30 s at most) until the guest on `host` counts past `tick`
/// without having booted again; its last tick.
fn counting_past(host: &Host, name: &str, tick: u64) -> anyhow::Result<u64> {
    wait_for(
        &format!("the guest's counter on {name}"),
        Duration::from_secs(30),
        || {
            let c: tandem_api::ConsoleChunk =
                block_on(host.api().get("/v1/vms/drill/console?offset=0")).ok()?;
            let t = last_tick(&c.data)?;
            (t > tick && !c.data.contains("TANDEM-GUEST-READY")).then_some(t)
        },
    )
}

/// Every reply the client got names a record the guest knows, with its
/// text ([`checker::check_vm`]).
fn verify_records(
    topo: &Topology,
    delivered: &[Delivered],
) -> anyhow::Result<Vec<checker::Violation>> {
    let delivered = delivered.to_vec();
    topology::spawn_in_ns(&topo.c, move || -> anyhow::Result<_> {
        let mut answers = std::collections::BTreeMap::new();
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
        Ok(checker::check_vm(&delivered, &answers, last))
    })?
    .join()
    .map_err(|_| anyhow!("the record check panicked"))??
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bad_document_differs_from_the_good_one_only_in_the_management_vlan() {
        let s = Slot {
            short: "a",
            name: "host-a",
            ns: "x".into(),
            uplink: UPLINK_A,
            mgmt_ip: MGMT_A,
            repl_ip: REPL_A,
            host: None,
        };
        let part = |vlan| {
            format!(
                "{}{}",
                shared_groups(vlan, true),
                host_ports(&s, "[[host.uplink]]", "[[host.host_port]]")
            )
        };
        let (good, bad) = (part(MGMT_VLAN), part(CUT_VLAN));
        let diff: Vec<(&str, &str)> = good
            .lines()
            .zip(bad.lines())
            .filter(|(g, b)| g != b)
            .collect();
        assert_eq!(diff, vec![("vlan = 10", "vlan = 20")]);
        // The host's own start document has no `vms`: only the
        // distributed switch brings it.
        assert!(!Lab::bootstrap_switch(&s).contains("\"vms\""));
    }

    #[test]
    fn hosts_are_found_in_lists_and_in_reports() {
        let list = serde_json::json!([{"name": "host-a"}, {"name": "host-b"}]);
        let report = serde_json::json!({"hosts": [{"host": "host-b", "result": "skipped"}]});
        assert!(host_in(&list, "host-b").is_some());
        assert_eq!(host_in(&report, "host-b").unwrap()["result"], "skipped");
        assert!(host_in(&report, "host-a").is_none());
        assert_eq!(outcomes(&report), "host-b skipped");
    }
}
