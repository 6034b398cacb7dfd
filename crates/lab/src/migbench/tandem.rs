//! The tandem side: the drill's topology and hosts (a tandemd per host,
//! the guest's NIC on the tandem switch, uplinks to the client's bridge),
//! the guest migrated by `tandem migrate` over the A–B link.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tandem_api::{MigrationPhase, MigrationReport};

use super::netfollow::{self, Dhcpd, Streams};
use super::{check_interrupted, guest_spec, shape_link, wait_ready, MigOptions, Moved, System};
use crate::topology::{Topology, REPL_A, REPL_B, UPLINK_A, UPLINK_B};
use crate::{block_on, tail, DrillOptions, Host};

/// `tandem migrate` is killed after this long (its ladder ends a
/// migration that cannot finish well before).
const CLI_BOUND: Duration = Duration::from_secs(600);
/// `--protected`: the guest's first protection (its whole RAM copied to
/// the backup) must be in place within this long.
const PROTECT_BOUND: Duration = Duration::from_secs(120);

/// `--protected`: the fencing and takeover timeouts of all three tandemds
/// (heartbeats at tandemd's default 100 ms). Generous, as in the COLO
/// bench: on a busy 2-core machine a resync can starve heartbeats past
/// tandemd's default 1.5 s, and failure detection is not what this bench
/// measures. They do not change when an epoch commits.
const PROTECTED_TIMEOUTS: crate::FtTimeouts = crate::FtTimeouts {
    heartbeat_ms: 100,
    fence_timeout_ms: 5000,
    takeover_timeout_ms: 7500,
};

/// Which tandem a site runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavour {
    /// tandem as it ships.
    Tandem,
    /// `--netfollow`'s control: both tandemds associate every arriving VM
    /// as a new one (`--fault-association new`, a fault-injection build),
    /// what a switch without the migrated flag does. Its group has no IP
    /// source guard: with one the guest is cut off until its lease's T1
    /// (tests/netfollow.rs shows that), and nothing else could be measured.
    NoFlag,
}

pub(super) struct TandemSite {
    // Field order is drop order: the daemons (and their QEMUs) go before
    // the namespaces they live in.
    /// `--netfollow`: the sender, then dhcpd.
    streams: Option<Streams>,
    _dhcpd: Option<Dhcpd>,
    /// `--protected`: the backup tandemd (in the client's namespace) the
    /// guest is protected to, wherever it runs. First to go: a backup
    /// outliving its primary would take the guest over.
    d: Option<Host>,
    a: Host,
    b: Host,
    topo: Topology,
    /// Whether the guest is on host A.
    at_a: bool,
    tandem: std::path::PathBuf,
    bandwidth_mib_s: u64,
    work: std::path::PathBuf,
    flavour: Flavour,
}

impl TandemSite {
    pub(super) fn start(
        o: &MigOptions,
        flavour: Flavour,
        tag: &str,
        work: &Path,
        say: &mut dyn FnMut(&str),
    ) -> anyhow::Result<TandemSite> {
        std::fs::create_dir_all(work)?;
        let topo = Topology::create(tag).context("building tandem's namespaces")?;
        shape_link(&topo, o.bandwidth_mib_s)?;
        let dhcpd = if o.netfollow {
            Some(netfollow::prepare_fabric(&topo.c, &work.join("dhcpd"))?)
        } else {
            None
        };
        let opts = DrillOptions {
            rounds: 1,
            kill: None,
            seed: 1,
            epoch_ms: 50,
            memory_mib: o.memory_mib,
            output: "classified".into(),
            profile: "bulk-tcp".into(),
            unsafe_no_clamp: false,
            tandemd: o.tandemd.clone(),
            image_dir: o.image_dir.clone(),
            work_dir: work.to_path_buf(),
            timeouts: Default::default(),
        };
        // Without --protected, tandemd's defaults (no flags at all).
        let mut owned = if o.protected {
            PROTECTED_TIMEOUTS.tandemd_args()
        } else {
            Vec::new()
        };
        if flavour == Flavour::NoFlag {
            owned.extend(["--fault-association".to_string(), "new".to_string()]);
        }
        let timeouts: Vec<&str> = owned.iter().map(String::as_str).collect();
        // The backup: in the client's namespace (no uplink, its switch
        // only the guest's port group), reached over a Unix socket by
        // whichever of A and B runs the guest.
        let repl = format!("unix:{}", work.join("d-repl.sock").display());
        let d = if o.protected {
            let mut d_args = timeouts.clone();
            d_args.extend(["--repl-listen", repl.as_str()]);
            let doc = "[[port_group]]\nname = \"vms\"\nvlan = 10\n";
            Some(
                Host::start_with_switch("d", &topo.c, doc, &opts, work, &d_args)
                    .context("starting the backup tandemd")?,
            )
        } else {
            None
        };
        // Each host's RAM directory is /dev/shm/<work's name>-<host>.
        let (b, a) = if o.netfollow {
            let guard = flavour == Flavour::Tandem;
            let start = |name, ns: &str, uplink| {
                let doc = netfollow::switch_doc(uplink, guard);
                Host::start_with_switch(name, ns, &doc, &opts, work, &timeouts).map_err(|e| {
                    if flavour == Flavour::NoFlag {
                        e.context("the no-flag control needs tandemd built with the fault-injection feature: cargo build --release -p tandemd --features fault-injection")
                    } else {
                        e
                    }
                })
            };
            (
                start("b", &topo.b, UPLINK_B)?,
                start("a", &topo.a, UPLINK_A)?,
            )
        } else {
            (
                Host::start("b", &topo.b, UPLINK_B, &opts, work, &timeouts)?,
                Host::start("a", &topo.a, UPLINK_A, &opts, work, &timeouts)?,
            )
        };
        let spec = guest_spec(o, "backend = \"switch\"\nport_group = \"vms\"");
        let api = a.api();
        let _: tandem_api::VmInfo = block_on(api.post(
            "/v1/vms",
            &tandem_api::CreateVmRequest {
                spec_toml: spec,
                uuid: None,
            },
        ))
        .context("defining the guest on tandemd A")?;
        let _: tandem_api::VmInfo =
            block_on(api.post("/v1/vms/drill/start", &())).context("starting the guest")?;
        say("  tandem: booting the guest on A");
        wait_ready(
            "tandem's guest",
            Duration::from_secs(180),
            || {
                block_on(api.get::<tandem_api::ConsoleChunk>("/v1/vms/drill/console?offset=0"))
                    .ok()
                    .map(|c| c.data)
            },
            || Ok(()),
        )
        .with_context(|| format!("tandemd A's log:\n{}", tail(&a.log, 8)))?;
        if let Some(d) = &d {
            say("  tandem: protecting the guest on A to the backup tandemd");
            protect(&a, &repl).with_context(|| {
                format!(
                    "protecting the guest; tandemd A's log:\n{}\nthe backup's log:\n{}",
                    tail(&a.log, 8),
                    tail(&d.log, 8)
                )
            })?;
        }
        let streams = if o.netfollow {
            Some(Streams::start(&topo.c).context("the guest's streams")?)
        } else {
            None
        };
        Ok(TandemSite {
            streams,
            _dhcpd: dhcpd,
            flavour,
            d,
            a,
            b,
            topo,
            at_a: true,
            tandem: o.tandem.clone(),
            bandwidth_mib_s: o.bandwidth_mib_s,
            work: work.to_path_buf(),
        })
    }
}

/// Protects the guest on `a` to the backup at `repl` (epoch 50 ms, output
/// commit classified, profile `bulk-tcp`) and waits until `a` reports it
/// protected.
fn protect(a: &Host, repl: &str) -> anyhow::Result<()> {
    let _: tandem_api::FtStatus = block_on(a.api().post(
        "/v1/vms/drill/protect",
        &tandem_api::ProtectRequest {
            backup: repl.to_string(),
            epoch_ms: Some(50),
            output_mode: Some("classified".into()),
            profile: Some("bulk-tcp".into()),
            rules: None,
            hold_max_frames: None,
            hold_max_bytes: None,
            tracker: None,
            unsafe_no_clamp: false,
            generation: None,
        },
    ))
    .context("POST /v1/vms/drill/protect")?;
    let deadline = Instant::now() + PROTECT_BOUND;
    loop {
        check_interrupted()?;
        let last = match crate::ft_primary(a) {
            Ok(s) if s.state.as_str() == "protected" => return Ok(()),
            Ok(s) => format!("{} ({})", s.state, s.detail),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("not protected within {PROTECT_BOUND:?}; last status: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl System for TandemSite {
    fn name(&self) -> &'static str {
        match self.flavour {
            Flavour::Tandem => "tandem",
            Flavour::NoFlag => "noflag",
        }
    }

    fn streams(&self) -> Option<&Streams> {
        self.streams.as_ref()
    }

    fn binding_present(&self) -> Option<anyhow::Result<bool>> {
        self.streams.as_ref()?;
        let here = if self.at_a { &self.a } else { &self.b };
        Some(
            block_on(
                here.api()
                    .get::<Vec<tandem_api::NicHandover>>("/v1/vms/drill/network"),
            )
            .map(|nics| nics.iter().any(|n| !n.state.bindings.is_empty()))
            .context("GET /v1/vms/drill/network"),
        )
    }

    fn client_ns(&self) -> &str {
        &self.topo.c
    }

    fn direction(&self) -> &'static str {
        if self.at_a {
            "A->B"
        } else {
            "B->A"
        }
    }

    fn migrate(&mut self, _say: &mut dyn FnMut(&str)) -> anyhow::Result<Moved> {
        let (src, dst, listen) = if self.at_a {
            (&self.a, &self.b, REPL_B)
        } else {
            (&self.b, &self.a, REPL_A)
        };
        let mut cmd = Command::new(&self.tandem);
        cmd.arg("--socket")
            .arg(&src.socket)
            .args(["--json", "migrate", "drill", "--to-socket"])
            .arg(&dst.socket)
            .args([
                "--listen",
                &format!("{listen}:0"),
                "--bandwidth",
                &self.bandwidth_mib_s.to_string(),
            ]);
        let t0 = Instant::now();
        let (ok, stdout, stderr) = run_bounded(cmd, &self.work, CLI_BOUND)?;
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        let lines: Vec<Value> = stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let report: Option<MigrationReport> = lines
            .last()
            .filter(|v| v.get("phase").is_some() && v.get("vm").is_some())
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        let Some(report) = report else {
            bail!(
                "tandem migrate ended ({}) without a report: {}",
                if ok { "ok" } else { "failed" },
                stderr.trim()
            );
        };
        // QEMU's dirty-rate readings, as the progress events carry them.
        let seen = lines
            .iter()
            .filter_map(|v| v.get("dirty_rate_bps").and_then(Value::as_u64))
            .chain(std::iter::once(report.dirty_rate_bps))
            .max()
            .filter(|&b| b > 0)
            .map(|b| b as f64 / (1u64 << 20) as f64);
        let mut moved = Moved {
            first_commit_ms: report.first_commit_ms.map(|m| m as f64),
            stream_ms: Some(report.elapsed_ms as f64),
            downtime_ms: report.downtime_ms.map(|d| d as f64),
            transferred_bytes: report.transferred,
            rung: report.rung.clone(),
            dirty_seen_mib_s: seen,
            ..Moved::default()
        };
        match report.phase {
            MigrationPhase::Done if ok => {
                moved.converged = true;
                moved.total_ms = Some(total_ms);
                self.at_a = !self.at_a;
                if self.d.is_some() && moved.first_commit_ms.is_none() {
                    // Moved, but its output is still held (the CLI warned).
                    moved.note = Some(format!(
                        "moved, but no first commit to the backup reported: {}",
                        stderr.trim()
                    ));
                }
            }
            MigrationPhase::Aborted | MigrationPhase::Cancelled => {
                moved.note = Some(format!(
                    "the ladder gave up after {:.1} s: {}",
                    report.elapsed_ms as f64 / 1e3,
                    report.message.as_deref().unwrap_or("no reason given")
                ));
                moved.downtime_ms = None;
            }
            phase => bail!(
                "tandem migrate ended {phase:?}: {} {}",
                report.message.as_deref().unwrap_or(""),
                stderr.trim()
            ),
        }
        check_interrupted()?;
        Ok(moved)
    }
}

/// [`crate::bounded::run_bounded`], stopped by an interrupt: (success,
/// stdout, stderr).
fn run_bounded(
    cmd: Command,
    dir: &Path,
    timeout: Duration,
) -> anyhow::Result<(bool, String, String)> {
    let out = crate::bounded::run_bounded(cmd, dir, timeout, &|| check_interrupted().is_err());
    check_interrupted()?;
    let out = out?;
    Ok((out.status.success(), out.stdout, out.stderr))
}
