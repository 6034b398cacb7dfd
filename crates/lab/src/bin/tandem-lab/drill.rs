//! `tandem drill`: options, the run, and its report.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use tandem_lab::cluster::{ClusterBins, ClusterReport, StepStatus};
use tandem_lab::{DrillOptions, KillMode, RoundReport};

use crate::{print_json, tandemd_beside_lab};

#[derive(Args, Debug)]
pub struct DrillArgs {
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// qemu | network | tandemd (default: one of each, in turn).
    #[arg(long)]
    kill: Option<String>,
    /// Replays a drill's random choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 50)]
    epoch_ms: u64,
    #[arg(long, default_value_t = 128)]
    memory_mib: u32,
    /// Guest image directory.
    #[arg(
        long,
        env = "TANDEM_IMAGE_DIR",
        default_value = "/var/lib/tandem/images"
    )]
    image_dir: PathBuf,
    /// Scratch space for the drill's hosts.
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
    /// The tandemd binary (default: next to this one).
    #[arg(long)]
    tandemd: Option<PathBuf>,
    /// Output commit in the primary's switch: classified | all-hold |
    /// off. With `off` nothing is held and the drill must FAIL: that
    /// proves its checker can.
    #[arg(long, default_value = "classified")]
    output: String,
    /// Rule profile for `classified` (the drill puts its record
    /// service, TCP 7070, first as `hold`).
    #[arg(long, default_value = "bulk-tcp")]
    profile: String,
    /// TEST ONLY: pass TCP segments keep their real acknowledgements.
    /// The drill must then FAIL.
    #[arg(long, hide = true)]
    unsafe_no_clamp: bool,
    /// Skip the cluster steps (manager, join, distributed switch commit
    /// and self-rollback) that run before the failover rounds.
    #[arg(long)]
    no_cluster: bool,
}

/// `--json`: the cluster steps and the failover rounds.
#[derive(Serialize)]
struct Report<'a> {
    seed: u64,
    passed: bool,
    /// Absent with `--no-cluster`.
    cluster: Option<&'a ClusterReport>,
    rounds: &'a [RoundReport],
}

/// The drill drives its own runtimes and processes: no async runtime here.
pub fn run(args: DrillArgs, json: bool) -> anyhow::Result<()> {
    let DrillArgs {
        rounds,
        kill,
        seed,
        epoch_ms,
        memory_mib,
        image_dir,
        work_dir,
        tandemd,
        output,
        profile,
        unsafe_no_clamp,
        no_cluster,
    } = args;
    output
        .parse::<tandem_outcommit::GateMode>()
        .map_err(|e| anyhow::anyhow!("--output: {e}"))?;
    profile
        .parse::<tandem_outcommit::Profile>()
        .map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
    let kill = kill
        .map(|k| k.parse::<KillMode>())
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let tandemd = match tandemd {
        Some(t) => t,
        None => tandemd_beside_lab()?,
    };
    let opts = DrillOptions {
        rounds,
        kill,
        seed,
        epoch_ms,
        memory_mib,
        output: output.clone(),
        profile,
        unsafe_no_clamp,
        tandemd,
        image_dir,
        work_dir,
        timeouts: Default::default(),
    };
    if output == "off" {
        eprintln!("WARNING: --output off: replies are released before commit; this drill is expected to FAIL");
    }
    if unsafe_no_clamp {
        eprintln!("WARNING: --unsafe-no-clamp: acknowledgements leave before commit; this drill is expected to FAIL");
    }
    eprintln!("drill: {rounds} round(s), seed {seed} (replay with --seed {seed})");
    let cluster = if no_cluster {
        None
    } else {
        let bins = ClusterBins {
            tandem: beside_lab("tandem")?,
            manager: beside_lab("tandem-manager")?,
        };
        Some(tandem_lab::cluster::run(&opts, &bins, |m| {
            eprintln!("drill: {m}")
        })?)
    };
    let reports = tandem_lab::run(&opts, |m| eprintln!("drill: {m}"))?;
    let failed = reports.iter().filter(|r| !r.passed).count();
    let cluster_failed = cluster.as_ref().is_some_and(|c| !c.passed);
    if json {
        print_json(&Report {
            seed,
            passed: failed == 0 && !cluster_failed,
            cluster: cluster.as_ref(),
            rounds: &reports,
        })?;
    } else {
        if let Some(c) = &cluster {
            print_cluster(c);
        }
        print_drill(&reports, seed);
    }
    match (failed, cluster_failed) {
        (0, false) => Ok(()),
        (0, true) => bail!("a cluster step of the drill failed"),
        (n, c) => bail!(
            "{n} of {} drill round(s) violated an invariant{}",
            reports.len(),
            if c { "; a cluster step failed too" } else { "" }
        ),
    }
}

/// A binary installed next to this one (and so next to `tandem`).
fn beside_lab(name: &str) -> anyhow::Result<PathBuf> {
    std::env::current_exe()?
        .parent()
        .map(|d| d.join(name))
        .with_context(|| format!("locating {name}"))
}

fn print_cluster(c: &ClusterReport) {
    println!("\ncluster drill (a tandem-manager reaching each host only through its switch)");
    for s in &c.steps {
        let verdict = match s.status {
            StepStatus::Pass => "PASS",
            StepStatus::Fail => "FAIL",
            StepStatus::NotRun => "NOT RUN",
        };
        println!(
            "step {} {:<9} {:<8} {:>6.1} s",
            s.step,
            s.name,
            verdict,
            s.elapsed_ms / 1e3
        );
        for t in &s.timings {
            println!("       {:>8.0} ms  {}", t.ms, t.what);
        }
        for o in &s.observations {
            println!("       {o}");
        }
        for v in &s.violations {
            println!("       violation: {v}");
        }
    }
    if let Some(e) = &c.evidence {
        println!("       evidence kept in {}", e.display());
    }
    println!(
        "cluster verdict: {}",
        if c.passed {
            "PASS — joined, committed, fanned a template out (one image over the link, one clone local), the cut host restored itself and resynced, the guest migrated under load with its disk, and when its host was killed the other took it over with every reply kept"
        } else {
            "FAIL"
        }
    );
}

fn print_drill(reports: &[RoundReport], seed: u64) {
    println!("\nfailover drill report (seed {seed})");
    println!(
        "{:<6} {:<8} {:>8} {:>9} {:>8} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10}  verdict",
        "round",
        "kill",
        "replies",
        "discarded",
        "epochs",
        "pause p50",
        "pause p99",
        "detect ms",
        "wait ms",
        "restore ms",
        "served ms"
    );
    for r in reports {
        println!(
            "{:<6} {:<8} {:>8} {:>9} {:>8} {:>9.2} {:>9.2} {:>10.0} {:>10.0} {:>10.0} {:>10.0}  {}",
            r.round,
            r.kill
                .map(|k| format!("{k:?}").to_lowercase())
                .unwrap_or_default(),
            r.replies_delivered,
            r.replies_discarded,
            r.epochs_committed,
            r.pause_p50_ms,
            r.pause_p99_ms,
            r.detection_ms,
            r.fence_wait_ms,
            r.restore_ms,
            r.client_served_ms,
            if r.passed { "PASS" } else { "FAIL" }
        );
        println!("       guest memory after failover: {}", r.memory_check);
        println!(
            "       upload: client saw {} bytes acknowledged, resumed guest received {}",
            r.upload_acked, r.upload_received
        );
        for v in &r.violations {
            println!("       violation: {v}");
        }
    }
    let failed = reports.iter().filter(|r| !r.passed).count();
    println!(
        "verdict: {}",
        if failed == 0 {
            "PASS — every reply the client saw survived failover".to_string()
        } else {
            format!("FAIL — {failed} round(s) lost acknowledged output")
        }
    );
}
