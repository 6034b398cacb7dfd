//! `tandem drill`: options, the run, and its report.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
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
    let reports = tandem_lab::run(&opts, |m| eprintln!("drill: {m}"))?;
    let failed = reports.iter().filter(|r| !r.passed).count();
    if json {
        print_json(&reports)?;
    } else {
        print_drill(&reports, seed);
    }
    if failed > 0 {
        bail!(
            "{failed} of {} drill round(s) violated an invariant",
            reports.len()
        );
    }
    Ok(())
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
