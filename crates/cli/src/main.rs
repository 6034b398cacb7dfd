//! `tandem`: the command-line tool for tandemd.
//!
//! Human-readable output by default; `--json` prints the API's JSON for
//! scripts. Exit status is non-zero on any error.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde::Serialize;
use tandem_api::{
    ConsoleChunk, CreateVmRequest, FailoverReport, FtRole, FtStatus, HostInfo, ProtectRequest,
    StopRequest, VmInfo, VmSummary,
};

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "Fault-tolerant VMs beside QEMU: the tandem CLI"
)]
struct Cli {
    /// tandemd's API socket.
    #[arg(long, global = true, env = "TANDEM_SOCKET", default_value = tandem_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of human-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Manage VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// This host.
    #[command(subcommand)]
    Host(HostCmd),
    /// Protect a running VM: replicate it in epochs to a backup host.
    Protect {
        name: String,
        /// The backup tandemd's replication endpoint (HOST:PORT or unix:PATH).
        #[arg(long)]
        backup: String,
        /// Epoch length in milliseconds (10-1000).
        #[arg(long, default_value_t = 50)]
        epoch_ms: u64,
        /// Output commit on the VM's switch NICs: classified | all-hold |
        /// off (off: clients may see output a failover contradicts).
        #[arg(long, default_value = "classified")]
        output: String,
        /// Rule profile: conservative | sip-rtp | bulk-tcp.
        #[arg(long)]
        profile: Option<String>,
        /// A rule placed before the profile's (repeatable), e.g.
        /// `--rule "pass udp dport 5004-5100"`.
        #[arg(long = "rule")]
        rules: Vec<String>,
        /// Bound on held output, in frames (default 8192). When full, a new
        /// held frame is dropped (the guest's TCP retransmits).
        #[arg(long)]
        hold_max_frames: Option<usize>,
        /// Bound on held output, in bytes (default 16 MiB).
        #[arg(long)]
        hold_max_bytes: Option<usize>,
        /// Dirty-page tracker: auto (tandemd's --ft-tracker), scan or
        /// soft-dirty.
        #[arg(long)]
        tracker: Option<String>,
    },
    /// End protection of a VM (the backup is told; it will not take over).
    Unprotect { name: String },
    /// On the backup: run the VM here from its last committed epoch now.
    Failover { name: String },
    /// Fault tolerance.
    #[command(subcommand)]
    Ft(FtCmd),
    /// The host's virtual switch.
    #[command(subcommand)]
    Switch(SwitchCmd),
    /// Benchmarks (timing lives here, not in tests).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The failover drill on this machine: two hosts in network namespaces,
    /// a protected guest under a durable client workload, a random kill,
    /// and the invariants checked. Needs root. Exits non-zero on a violation.
    Drill {
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
    },
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// The switch alone between two VM ports: DPDK testpmd (virtio-user)
    /// sends on one port and receives on the other; Mpps and Gbit/s the
    /// switch delivers per frame size, median and p99 of per-second rates.
    /// Needs root; qemu-scripts/dpdk.sh provides testpmd and hugepages.
    SwitchPps {
        /// Seconds measured per size (1..=10), after a 1 s warm-up.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Ethernet frame sizes in bytes, without FCS.
        #[arg(long, value_delimiter = ',', default_value = "64,1500")]
        sizes: Vec<usize>,
        /// `SWITCH_CPU,TESTPMD_CPU`, or `none`.
        #[arg(long, default_value = "0,1")]
        pin: String,
        /// `loop`: one testpmd forwarding B's arrivals back into A (a
        /// closed loop, one polling thread); `split`: testpmd txonly on A
        /// and rxonly on B as two processes sharing the generator CPU.
        #[arg(long, default_value = "loop")]
        generator: String,
        /// The hugepage/testpmd helper (default: qemu-scripts/dpdk.sh here
        /// or in the source tree).
        #[arg(long)]
        dpdk_script: Option<PathBuf>,
    },
    /// tandem's vhost-user switch against tap + Linux bridge: host↔guest
    /// request/response latency and guest→guest TCP throughput, side by
    /// side in one run (pairs alternate each round).
    Switch {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Round trips per pair and round.
        #[arg(long, default_value_t = 300)]
        requests: usize,
        #[arg(long, default_value_t = 3000)]
        bulk_ms: u64,
        #[arg(long, default_value_t = 128)]
        memory_mib: u32,
        #[arg(
            long,
            env = "TANDEM_IMAGE_DIR",
            default_value = "/var/lib/tandem/images"
        )]
        image_dir: PathBuf,
    },
    /// Output commit: request/response latency (a passed reply and a held
    /// one) and guest→client bulk throughput with output commit off,
    /// all-hold and classified, side by side, per epoch length.
    Output {
        #[arg(long, value_delimiter = ',', default_value = "25,50,100")]
        epoch_ms: Vec<u64>,
        /// Round trips per kind and configuration.
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Length of each bulk transfer.
        #[arg(long, default_value_t = 3000)]
        bulk_ms: u64,
        #[arg(long, default_value_t = 128)]
        memory_mib: u32,
        #[arg(
            long,
            env = "TANDEM_IMAGE_DIR",
            default_value = "/var/lib/tandem/images"
        )]
        image_dir: PathBuf,
    },
    /// Guest throughput protected vs unprotected (CPU-bound and
    /// memory-dirtying work, timed from outside), per epoch length.
    Throughput {
        #[arg(long, value_delimiter = ',', default_value = "25,50,100")]
        epoch_ms: Vec<u64>,
        /// Iterations of CPU-bound work per measurement.
        #[arg(long, default_value_t = 200_000_000)]
        spin: u64,
        /// 4 KiB pages written per memory-dirtying measurement.
        #[arg(long, default_value_t = 200_000)]
        dirty: u64,
        /// Measurements per configuration (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long, default_value_t = 128)]
        memory_mib: u32,
        #[arg(
            long,
            env = "TANDEM_IMAGE_DIR",
            default_value = "/var/lib/tandem/images"
        )]
        image_dir: PathBuf,
    },
    /// One dirty-page collect with `scan` vs `soft-dirty`, side by side on
    /// the same memory, inside the guest (its kernel has soft-dirty bits;
    /// this host's may not). Median and p99 per size and write rate.
    Tracker {
        /// Memory tracked, MiB (each at most half the guest's RAM).
        #[arg(long, value_delimiter = ',', default_value = "32,64")]
        mib: Vec<u64>,
        /// Pages written per epoch.
        #[arg(long, value_delimiter = ',', default_value = "0,256,2048")]
        pages: Vec<u64>,
        #[arg(long, default_value_t = 30)]
        epochs: u32,
        #[arg(long, default_value_t = 256)]
        memory_mib: u32,
        #[arg(
            long,
            env = "TANDEM_IMAGE_DIR",
            default_value = "/var/lib/tandem/images"
        )]
        image_dir: PathBuf,
    },
    /// Failover time and epoch pause, side by side for several guest RAM
    /// sizes, over repeated drills (kill mode qemu). Reports median and p99.
    Failover {
        /// Drills per RAM size.
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        /// Guest RAM sizes to compare, in MiB.
        #[arg(long, value_delimiter = ',', default_value = "128,256")]
        memory_mib: Vec<u32>,
        #[arg(long, default_value_t = 50)]
        epoch_ms: u64,
        #[arg(
            long,
            env = "TANDEM_IMAGE_DIR",
            default_value = "/var/lib/tandem/images"
        )]
        image_dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// tandemd's failure-detection settings for both hosts (its
        /// defaults: 100 / 1500 / 2500). Detection is the takeover timeout,
        /// which must exceed the fence timeout by two heartbeats.
        #[arg(long, default_value_t = 100)]
        heartbeat_ms: u64,
        #[arg(long, default_value_t = 1500)]
        fence_timeout_ms: u64,
        #[arg(long, default_value_t = 2500)]
        takeover_timeout_ms: u64,
        /// What each drill kills on host A: qemu (a crash A's tandemd
        /// reports), network or tandemd (decided by silence).
        #[arg(long, default_value = "qemu")]
        kill: String,
    },
    /// Epoch pause, tandem (scan tracker) against QEMU's own COLO
    /// checkpointing on the same guest, one after the other per cell:
    /// p50/p99 from the primary QEMU's STOP/RESUME events, and checkpoints
    /// per second. Needs root and qemu-scripts/colo-qemu.sh (COLO is broken
    /// in QEMU 10.0; it unpacks Debian's 7.2 privately).
    Pause {
        /// Guest RAM sizes, in MiB.
        #[arg(long, value_delimiter = ',', default_value = "128,256,512")]
        memory_mib: Vec<u32>,
        /// tandem's epoch and COLO's x-checkpoint-delay.
        #[arg(long, default_value_t = 50)]
        epoch_ms: u64,
        /// Guest memory dirtied per second, MiB/s (0: idle): one `DIRTY`
        /// request per epoch rewriting that much of the guest's buffer.
        #[arg(long, value_delimiter = ',', default_value = "0,16,64")]
        dirty: Vec<u64>,
        /// Seconds measured per system and cell.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Chooses which system runs first in each cell.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The QEMU for the COLO peer.
        #[arg(
            long,
            default_value = "/var/cache/tandem/qemu-7.2/root/usr/bin/qemu-system-x86_64"
        )]
        colo_qemu: PathBuf,
        /// LD_PRELOAD for the COLO QEMUs (qemu-scripts/colo-bql-shim.c),
        /// or `none`.
        #[arg(long, default_value = "/var/cache/tandem/qemu-7.2/colo-bql-shim.so")]
        colo_shim: String,
        /// The QEMU tandemd runs the guest on.
        #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
        qemu: PathBuf,
        #[arg(
            long,
            env = "TANDEM_IMAGE_DIR",
            default_value = "/var/lib/tandem/images"
        )]
        image_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum SwitchCmd {
    /// The switch's configuration document (TOML).
    Show,
    /// Replace the whole configuration with a document (`-`: standard
    /// input). It is validated completely first; an invalid document, or a
    /// port that cannot be created, changes nothing.
    Apply { document: PathBuf },
    /// Ports, their counters and drops by reason, uplink members, MAC table.
    Stats,
}

#[derive(Subcommand, Debug)]
enum FtCmd {
    /// Replication state of protected VMs on this host (either role).
    Status { name: Option<String> },
    /// Output-commit rules of a protected VM (on its primary).
    #[command(subcommand)]
    Rules(RulesCmd),
}

#[derive(Subcommand, Debug)]
enum RulesCmd {
    /// The rule table, first match first.
    Show { name: String },
    /// Replace the table: `--profile P`, `--rule R` (repeatable; before the
    /// profile's), and/or `--mode classified|all-hold|off`.
    Set {
        name: String,
        #[arg(long)]
        profile: Option<String>,
        #[arg(long = "rule")]
        rules: Vec<String>,
        #[arg(long)]
        mode: Option<String>,
    },
    /// Insert a rule (default: at the end), e.g. `add vm1 "pass udp dport 5004"`.
    Add {
        name: String,
        rule: String,
        /// 1-based position.
        #[arg(long)]
        position: Option<usize>,
    },
    /// Delete the rule at a 1-based position.
    Del { name: String, position: usize },
}

#[derive(Subcommand, Debug)]
enum VmCmd {
    /// Define a VM from a TOML spec file (`-` reads standard input).
    Create {
        spec: PathBuf,
        /// Start it right away.
        #[arg(long)]
        start: bool,
    },
    /// Start a defined or stopped VM.
    Start { name: String },
    /// List VMs.
    List,
    /// Show a VM, including QEMU's live run state.
    Info { name: String },
    /// Pause a running VM (its vCPUs stop).
    Pause { name: String },
    /// Resume a paused VM.
    Resume { name: String },
    /// Stop a VM: ACPI power-down, then quit/kill after the timeout.
    Stop {
        name: String,
        /// Seconds to wait for the guest (default: the spec's shutdown_timeout_s).
        #[arg(long)]
        timeout: Option<u64>,
        /// Kill QEMU without asking the guest.
        #[arg(long)]
        force: bool,
    },
    /// Stop if needed, and remove the VM and its files.
    Destroy { name: String },
    /// Write a consistent checkpoint (RAM, device state, disks) of a running
    /// or paused VM into a new directory on the daemon's host.
    Checkpoint { name: String, dir: PathBuf },
    /// Start a stopped VM from a checkpoint directory instead of booting.
    Restore { name: String, dir: PathBuf },
    /// Print the serial console log.
    Console {
        name: String,
        /// Keep following new output until the VM stops (or Ctrl-C).
        #[arg(short, long)]
        follow: bool,
        /// Follow until this text appears, then exit 0 (implies --follow).
        #[arg(long)]
        until: Option<String>,
        /// Give up following after this many seconds (exit 1).
        #[arg(long)]
        timeout: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum HostCmd {
    /// QEMU version, accelerator decision and its evidence.
    Info,
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let result = if matches!(cli.cmd, Cmd::Bench(_)) {
        bench(cli)
    } else if matches!(cli.cmd, Cmd::Drill { .. }) {
        drill(cli)
    } else {
        rt.block_on(run(cli))
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `tandem drill` drives its own runtimes and processes; it runs outside
/// the CLI's async runtime.
fn drill(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    if let Cmd::Drill {
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
    } = cli.cmd
    {
        output
            .parse::<tandem_outcommit::GateMode>()
            .map_err(|e| anyhow::anyhow!("--output: {e}"))?;
        profile
            .parse::<tandem_outcommit::Profile>()
            .map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
        let kill = kill
            .map(|k| k.parse::<tandem_lab::KillMode>())
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
            None => tandemd_beside_cli()?,
        };
        let opts = tandem_lab::DrillOptions {
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
    }
    Ok(())
}

/// The tandemd installed next to this CLI.
fn tandemd_beside_cli() -> anyhow::Result<PathBuf> {
    std::env::current_exe()?
        .parent()
        .map(|d| d.join("tandemd"))
        .context("locating tandemd")
}

/// The drill site every benchmark builds on: one guest of `memory_mib`,
/// 50 ms epochs, output commit as the drill runs it.
fn bench_options(
    memory_mib: u32,
    image_dir: &std::path::Path,
) -> anyhow::Result<tandem_lab::DrillOptions> {
    Ok(tandem_lab::DrillOptions {
        rounds: 1,
        kill: None,
        seed: 1,
        epoch_ms: 50,
        memory_mib,
        output: "classified".into(),
        profile: "bulk-tcp".into(),
        unsafe_no_clamp: false,
        tandemd: tandemd_beside_cli()?,
        image_dir: image_dir.to_path_buf(),
        work_dir: PathBuf::from("/tmp"),
        timeouts: Default::default(),
    })
}

fn bench(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Bench(BenchCmd::SwitchPps {
        seconds,
        sizes,
        pin,
        generator,
        dpdk_script,
    }) = &cli.cmd
    {
        let generator = generator
            .parse::<tandem_lab::ppsbench::Generator>()
            .map_err(|e| anyhow::anyhow!("--generator: {e}"))?;
        let pin_cpus = match pin.as_str() {
            "none" => None,
            p => {
                let (s, g) = p
                    .split_once(',')
                    .and_then(|(s, g)| Some((s.trim().parse().ok()?, g.trim().parse().ok()?)))
                    .context("--pin: SWITCH_CPU,TESTPMD_CPU (e.g. 0,1) or none")?;
                Some((s, g))
            }
        };
        let script = dpdk_script.clone().unwrap_or_else(|| {
            let here = PathBuf::from("qemu-scripts/dpdk.sh");
            if here.is_file() {
                here
            } else {
                PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../qemu-scripts/dpdk.sh"
                ))
            }
        });
        let opts = tandem_lab::ppsbench::PpsOptions {
            seconds: *seconds,
            sizes: sizes.clone(),
            pin: pin_cpus,
            generator,
            dpdk_script: script,
            work_dir: PathBuf::from("/tmp"),
        };
        let rows = tandem_lab::ppsbench::switch_pps(&opts, |m| eprintln!("bench: {m}"))?;
        if cli.json {
            return print_json(&rows);
        }
        let pinned = match pin_cpus {
            Some((s, g)) => format!("switch (all its threads) on CPU {s}, both testpmd on CPU {g}"),
            None => "nothing pinned".into(),
        };
        println!(
            "\nswitch forwarding, port A -> port B, testpmd virtio-user ({} generator); {pinned}; {seconds} x 1 s per size",
            generator.name()
        );
        println!(
            "{:>7} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>10} {:>10} {:>12} {:>8}",
            "frame",
            "Mpps med",
            "Mpps p99",
            "Mpps min",
            "Gbit/s med",
            "Gbit/s p99",
            "sw CPU",
            "Mpps/core",
            "Gbit/s/core",
            "others/steal",
            "dropped"
        );
        for r in &rows {
            let others = match (r.others_on_switch_cpu, r.steal_on_switch_cpu) {
                (Some(o), Some(s)) => format!("{:.0}%/{:.0}%", o * 100.0, s * 100.0),
                _ => "-".to_string(),
            };
            println!(
                "{:>5} B {:>9.3} {:>9.3} {:>9.3} {:>10.2} {:>10.2} {:>7.0}% {:>10.3} {:>11.2} {:>12} {:>8}",
                r.frame_bytes,
                r.mpps_median,
                r.mpps_p99,
                r.mpps_min,
                r.gbit_s_median,
                r.gbit_s_p99,
                r.switch_cpu_share_median * 100.0,
                r.mpps_per_core_median,
                r.gbit_s_per_core_median,
                others,
                r.dropped
            );
        }
        println!("(med/p99/min of 1 s samples; sw CPU: share of one core the switch used; per core: per CPU-second it used; others/steal: the switch's CPU used by other processes / stolen by the hypervisor)");
        for r in &rows {
            if let Some(t) = r.testpmd_rx_total {
                println!(
                    "{} B: testpmd received {t} frames, the switch delivered {}; testpmd dropped {} on TX",
                    r.frame_bytes, r.switch_tx_total, r.testpmd_tx_dropped
                );
            }
        }
        let sizes: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
        println!(
            "reproduce: tandem bench switch-pps --seconds {seconds} --sizes {} --pin {pin} --generator {}",
            sizes.join(","),
            generator.name()
        );
        return Ok(());
    }
    if let Cmd::Bench(BenchCmd::Switch {
        rounds,
        requests,
        bulk_ms,
        memory_mib,
        image_dir,
    }) = &cli.cmd
    {
        let opts = bench_options(*memory_mib, image_dir)?;
        let rows = tandem_lab::switchbench::switch_vs_bridge(
            &opts,
            *rounds,
            *requests,
            *bulk_ms,
            |m| eprintln!("bench: {m}"),
        )?;
        if cli.json {
            return print_json(&rows);
        }
        println!("\nswitch vs bridge ({memory_mib} MiB TCG guests; {rounds} rounds of {requests} round trips and a {bulk_ms} ms transfer per path)");
        println!(
            "{:<28} {:>12} {:>12} {:>16}",
            "path", "rr p50", "rr p99", "bulk Mbit/s (med)"
        );
        for r in &rows {
            println!(
                "{:<28} {:>9.3} ms {:>9.3} ms {:>16.1}",
                r.path, r.rr_p50_ms, r.rr_p99_ms, r.bulk_mbit_s_median
            );
        }
        if let [sw, br] = rows.as_slice() {
            println!(
                "ratio switch/bridge: rr p50 {:.2}, bulk {:.2}",
                sw.rr_p50_ms / br.rr_p50_ms,
                sw.bulk_mbit_s_median / br.bulk_mbit_s_median
            );
        }
        println!(
            "reproduce: tandem bench switch --rounds {rounds} --requests {requests} --bulk-ms {bulk_ms} --memory-mib {memory_mib}"
        );
        return Ok(());
    }
    if let Cmd::Bench(BenchCmd::Output {
        epoch_ms,
        requests,
        bulk_ms,
        memory_mib,
        image_dir,
    }) = &cli.cmd
    {
        let opts = bench_options(*memory_mib, image_dir)?;
        let rows = tandem_lab::bench::output(&opts, epoch_ms, *requests, *bulk_ms, |m| {
            eprintln!("bench: {m}")
        })?;
        if cli.json {
            return print_json(&rows);
        }
        println!("\noutput commit ({memory_mib} MiB guest; {requests} round trips per kind; bulk-tcp profile, PONG passed, PUT replies held)");
        println!(
            "{:>6} {:>11} {:>14} {:>14} {:>14} {:>14} {:>11}",
            "epoch",
            "mode",
            "pass rr p50",
            "pass rr p99",
            "hold rr p50",
            "hold rr p99",
            "bulk Mbit/s"
        );
        for r in &rows {
            println!(
                "{:>6} {:>11} {:>11.2} ms {:>11.2} ms {:>11.2} ms {:>11.2} ms {:>11.1}",
                format!("{} ms", r.epoch_ms),
                r.mode,
                r.pass_rr_p50_ms,
                r.pass_rr_p99_ms,
                r.hold_rr_p50_ms,
                r.hold_rr_p99_ms,
                r.bulk_mbit_s
            );
        }
        println!(
            "reproduce: tandem bench output --epoch-ms {} --requests {requests} --bulk-ms {bulk_ms} --memory-mib {memory_mib}",
            epoch_ms.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(",")
        );
        return Ok(());
    }
    if let Cmd::Bench(BenchCmd::Throughput {
        epoch_ms,
        spin,
        dirty,
        reps,
        memory_mib,
        image_dir,
    }) = &cli.cmd
    {
        let opts = bench_options(*memory_mib, image_dir)?;
        let rows = tandem_lab::bench::throughput(&opts, epoch_ms, *spin, *dirty, *reps, |m| {
            eprintln!("bench: {m}")
        })?;
        if cli.json {
            return print_json(&rows);
        }
        println!("\nguest throughput, protected vs unprotected ({memory_mib} MiB guest, median of {reps})");
        println!(
            "{:>10} {:>10} {:>8} {:>10} {:>8} {:>10} {:>10} {:>9}",
            "epoch", "spin ms", "ratio", "dirty ms", "ratio", "pause p50", "pause p99", "epochs/s"
        );
        for r in &rows {
            println!(
                "{:>10} {:>10.0} {:>8.2} {:>10.0} {:>8.2} {:>10.2} {:>10.2} {:>9.1}",
                r.epoch_ms
                    .map(|e| format!("{e} ms"))
                    .unwrap_or("off".into()),
                r.spin_ms_median,
                r.spin_ratio,
                r.dirty_ms_median,
                r.dirty_ratio,
                r.pause_p50_ms,
                r.pause_p99_ms,
                r.epochs_per_s
            );
        }
        println!(
            "reproduce: tandem bench throughput --epoch-ms {} --spin {spin} --dirty {dirty} --reps {reps} --memory-mib {memory_mib}",
            epoch_ms.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(",")
        );
        return Ok(());
    }
    if let Cmd::Bench(BenchCmd::Tracker {
        mib,
        pages,
        epochs,
        memory_mib,
        image_dir,
    }) = &cli.cmd
    {
        let opts = bench_options(*memory_mib, image_dir)?;
        let rows =
            tandem_lab::bench::tracker(&opts, mib, pages, *epochs, |m| eprintln!("bench: {m}"))?;
        if cli.json {
            return print_json(&rows);
        }
        println!(
            "\none dirty-page collect inside the guest (TCG, {memory_mib} MiB guest), {epochs} epochs per line, in µs"
        );
        println!(
            "{:>6} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} | {:>8} {:>8} {:>8}",
            "MiB",
            "written",
            "scan p50",
            "scan p99",
            "soft p50",
            "soft p99",
            "x p50",
            "x p99",
            "scan rep",
            "soft rep",
            "read",
            "decide",
            "clear"
        );
        for r in &rows {
            println!(
                "{:>6} {:>8} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>8.1} {:>8.1} {:>9} {:>9} | {:>8.0} {:>8.0} {:>8.0}",
                r.mib,
                r.per_epoch,
                r.scan_p50_us,
                r.scan_p99_us,
                r.soft_p50_us,
                r.soft_p99_us,
                r.scan_p50_us / r.soft_p50_us.max(1.0),
                r.scan_p99_us / r.soft_p99_us.max(1.0),
                r.scan_reported,
                r.soft_reported,
                r.soft_read_p50_us,
                r.soft_decide_p50_us,
                r.soft_clear_p50_us
            );
        }
        println!(
            "(x = scan / soft-dirty; rep = pages reported per epoch; read/decide/clear = the soft-dirty collect's parts, p50 µs; punches seen by {})",
            rows.first().map(|r| r.punches.as_str()).unwrap_or("?")
        );
        let join = |v: &[u64]| {
            v.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        println!(
            "reproduce: tandem bench tracker --mib {} --pages {} --epochs {epochs} --memory-mib {memory_mib}",
            join(mib),
            join(pages)
        );
        return Ok(());
    }
    if let Cmd::Bench(BenchCmd::Pause {
        memory_mib,
        epoch_ms,
        dirty,
        seconds,
        seed,
        colo_qemu,
        colo_shim,
        qemu,
        image_dir,
    }) = &cli.cmd
    {
        let opts = tandem_lab::colobench::PauseOptions {
            memory_mib: memory_mib.clone(),
            epoch_ms: *epoch_ms,
            dirty_mib_s: dirty.clone(),
            seconds: *seconds,
            seed: *seed,
            tandemd: tandemd_beside_cli()?,
            qemu: qemu.clone(),
            colo_qemu: colo_qemu.clone(),
            colo_shim: (colo_shim != "none").then(|| PathBuf::from(colo_shim)),
            image_dir: image_dir.clone(),
            work_dir: PathBuf::from("/tmp"),
        };
        let r = tandem_lab::colobench::pause_vs_colo(&opts, |m| eprintln!("bench: {m}"))?;
        if cli.json {
            return print_json(&r);
        }
        println!(
            "\nepoch pause, tandem (scan) vs QEMU COLO, epoch = x-checkpoint-delay = {epoch_ms} ms, {seconds} s per system and cell"
        );
        println!("tandem: {}", r.tandem_qemu);
        println!(
            "COLO:   {}{}",
            r.colo_qemu,
            r.colo_shim
                .as_ref()
                .map(|s| format!(" + LD_PRELOAD {}", s.display()))
                .unwrap_or_default()
        );
        println!(
            "{:>5} {:>6} | {:>27} {:>8} {:>8} | {:>27} {:>8} {:>8} | {:>16}",
            "RAM",
            "dirty",
            "tandem pause p50 / p99 ms",
            "ckpt/s",
            "dirtied",
            "COLO pause p50 / p99 ms",
            "ckpt/s",
            "dirtied",
            "tandem/COLO p50, p99"
        );
        for row in &r.rows {
            println!(
                "{:>5} {:>6} | {:>13.2} / {:>11.2} {:>8.1} {:>8.1} | {:>13.2} / {:>11.2} {:>8.1} {:>8.1} | {:>8.2}, {:>6.2}",
                row.memory_mib,
                row.dirty_mib_s,
                row.tandem.pause_p50_ms,
                row.tandem.pause_p99_ms,
                row.tandem.checkpoints_per_s,
                row.tandem.dirtied_mib_s,
                row.colo.pause_p50_ms,
                row.colo.pause_p99_ms,
                row.colo.checkpoints_per_s,
                row.colo.dirtied_mib_s,
                row.ratio_p50,
                row.ratio_p99
            );
        }
        println!("(RAM in MiB; dirty: offered MiB/s; dirtied: MiB/s the guest got done; pause from the primary QEMU's STOP/RESUME events)");
        for row in &r.rows {
            for (name, side) in [("tandem", &row.tandem), ("COLO", &row.colo)] {
                if let Some(e) = &side.error {
                    println!(
                        "{name} FAILED at {} MiB / {} MiB/s (its numbers above are zero): {e}",
                        row.memory_mib, row.dirty_mib_s
                    );
                }
            }
            for (n, why) in row.colo.failed_attempts.iter().enumerate() {
                println!(
                    "COLO {} MiB / {} MiB/s, failed attempt {}: {why}",
                    row.memory_mib,
                    row.dirty_mib_s,
                    n + 1
                );
            }
        }
        let join = |v: &[u64]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mem: Vec<u64> = memory_mib.iter().map(|&m| m as u64).collect();
        println!(
            "reproduce: tandem bench pause --memory-mib {} --epoch-ms {epoch_ms} --dirty {} --seconds {seconds} --seed {seed}",
            join(&mem),
            join(dirty)
        );
        return Ok(());
    }
    let Cmd::Bench(BenchCmd::Failover {
        rounds,
        memory_mib,
        epoch_ms,
        image_dir,
        seed,
        heartbeat_ms,
        fence_timeout_ms,
        takeover_timeout_ms,
        kill,
    }) = cli.cmd
    else {
        bail!("unknown benchmark");
    };
    let kill_mode = kill
        .parse::<tandem_lab::KillMode>()
        .map_err(|e| anyhow::anyhow!("--kill: {e}"))?;
    let mut rows = Vec::new();
    for &mem in &memory_mib {
        let opts = tandem_lab::DrillOptions {
            rounds,
            kill: Some(kill_mode),
            seed,
            epoch_ms,
            timeouts: tandem_lab::FtTimeouts {
                heartbeat_ms,
                fence_timeout_ms,
                takeover_timeout_ms,
            },
            ..bench_options(mem, &image_dir)?
        };
        eprintln!("bench: {rounds} drills with a {mem} MiB guest");
        let r = tandem_lab::run(&opts, |m| eprintln!("bench: {m}"))?;
        rows.push((mem, r));
    }
    let pct = |mut v: Vec<f64>, p: f64| tandem_lab::stats_ms(&mut v, p);
    println!(
        "\nfailover benchmark: kill {kill}, epoch {epoch_ms} ms, heartbeat {heartbeat_ms} ms, fence {fence_timeout_ms} ms, takeover {takeover_timeout_ms} ms; {rounds} drills per size (median / p99)"
    );
    println!(
        "{:>8} {:>19} {:>19} {:>19} {:>19} {:>19} {:>19} {:>19}",
        "RAM MiB",
        "pause p50 ms",
        "pause p99 ms",
        "detect ms",
        "fence wait ms",
        "restore ms",
        "served ms",
        "all rounds pass"
    );
    for (mem, r) in &rows {
        let col = |f: &dyn Fn(&tandem_lab::RoundReport) -> f64| {
            let v: Vec<f64> = r.iter().map(f).collect();
            format!("{:>8.1} / {:>8.1}", pct(v.clone(), 50.0), pct(v, 99.0))
        };
        println!(
            "{:>8} {} {} {} {} {} {} {:>19}",
            mem,
            col(&|x| x.pause_p50_ms),
            col(&|x| x.pause_p99_ms),
            col(&|x| x.detection_ms),
            col(&|x| x.fence_wait_ms),
            col(&|x| x.restore_ms),
            col(&|x| x.client_served_ms),
            r.iter().all(|x| x.passed)
        );
    }
    println!(
        "reproduce: tandem bench failover --rounds {rounds} --memory-mib {} --epoch-ms {epoch_ms} --seed {seed} --heartbeat-ms {heartbeat_ms} --fence-timeout-ms {fence_timeout_ms} --takeover-timeout-ms {takeover_timeout_ms} --kill {kill}",
        memory_mib.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(",")
    );
    Ok(())
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = tandem_api::Client::new(&cli.socket);
    let json = cli.json;
    match cli.cmd {
        Cmd::Host(HostCmd::Info) => {
            let h: HostInfo = client.get("/v1/host").await?;
            if json {
                return print_json(&h);
            }
            println!("host:          {}", h.hostname);
            println!("tandem:        {}", h.tandem_version);
            println!("qemu:          {} ({})", h.qemu_version, h.qemu_binary);
            println!("state dir:     {}", h.state_dir);
            println!("vms:           {}", h.vms);
            println!("accelerator:   auto = {}", h.accel.chosen);
            println!("  reason:      {}", h.accel.reason);
            println!("  cpu vmx/svm: {}", yes_no(h.accel.cpu_virt_flag));
            println!("  /dev/kvm:    {}", yes_no(h.accel.dev_kvm));
            println!(
                "  modules:     {}",
                if h.accel.kvm_modules.is_empty() {
                    "none".to_string()
                } else {
                    h.accel.kvm_modules.join(", ")
                }
            );
            println!(
                "  probe boot:  {} (bound {} ms)",
                h.accel.probe_boot.as_deref().unwrap_or("not needed"),
                h.accel.probe_timeout_ms
            );
        }
        Cmd::Vm(VmCmd::Create { spec, start }) => {
            let text = if spec.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            } else {
                std::fs::read_to_string(&spec)
                    .with_context(|| format!("reading {}", spec.display()))?
            };
            let mut vm: VmInfo = client
                .post("/v1/vms", &CreateVmRequest { spec_toml: text })
                .await?;
            if start {
                vm = client
                    .post(&format!("/v1/vms/{}/start", vm.name), &())
                    .await?;
            }
            if json {
                return print_json(&vm);
            }
            println!(
                "VM {} {}",
                vm.name,
                if start {
                    "created and started"
                } else {
                    "created"
                }
            );
        }
        Cmd::Vm(VmCmd::Start { name }) => {
            let vm: VmInfo = client.post(&format!("/v1/vms/{name}/start"), &()).await?;
            if json {
                return print_json(&vm);
            }
            println!(
                "VM {} {} (pid {}, accelerator {})",
                vm.name,
                vm.state,
                vm.pid.map(|p| p.to_string()).unwrap_or("-".into()),
                vm.accel.as_deref().unwrap_or("-")
            );
        }
        Cmd::Protect {
            name,
            backup,
            epoch_ms,
            output,
            profile,
            rules,
            hold_max_frames,
            hold_max_bytes,
            tracker,
        } => {
            if output == "off" {
                eprintln!("WARNING: output commit OFF: clients can see output that a failover will contradict");
            }
            let st: FtStatus = client
                .post(
                    &format!("/v1/vms/{name}/protect"),
                    &ProtectRequest {
                        backup,
                        epoch_ms: Some(epoch_ms),
                        output_mode: Some(output),
                        profile,
                        rules: (!rules.is_empty()).then_some(rules),
                        hold_max_frames,
                        hold_max_bytes,
                        tracker,
                        unsafe_no_clamp: false,
                    },
                )
                .await?;
            if json {
                return print_json(&st);
            }
            println!(
                "protecting {name} to {} every {} ms ({}); see `tandem ft status {name}`",
                st.peer, st.epoch_ms, st.state
            );
        }
        Cmd::Unprotect { name } => {
            let st: FtStatus = client
                .post(&format!("/v1/vms/{name}/unprotect"), &())
                .await?;
            if json {
                return print_json(&st);
            }
            println!(
                "{name} is no longer protected (last committed epoch {})",
                st.last_committed
            );
        }
        Cmd::Failover { name } => {
            let r: FailoverReport = client
                .post(&format!("/v1/vms/{name}/failover"), &())
                .await?;
            if json {
                return print_json(&r);
            }
            println!(
                "{name} runs here from epoch {} (restore {:.0} ms)",
                r.epoch, r.restore_ms
            );
        }
        Cmd::Drill { .. } | Cmd::Bench(_) => bail!("the drill runs outside the async runtime"),
        Cmd::Switch(SwitchCmd::Show) => {
            let d: tandem_api::SwitchDocumentBody = client.get("/v1/switch").await?;
            if json {
                return print_json(&d);
            }
            print!("{}", d.document_toml);
        }
        Cmd::Switch(SwitchCmd::Apply { document }) => {
            let document_toml = if document.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&document)
                    .with_context(|| format!("reading {}", document.display()))?
            };
            let r: tandem_switch::host::ApplyReport = client
                .post(
                    "/v1/switch/apply",
                    &tandem_api::SwitchDocumentBody { document_toml },
                )
                .await?;
            if json {
                return print_json(&r);
            }
            println!(
                "applied: {} port(s) added, {} removed, {} unchanged",
                r.added.len(),
                r.removed.len(),
                r.unchanged.len()
            );
            for n in &r.added {
                println!("  + {n}");
            }
            for n in &r.removed {
                println!("  - {n}");
            }
        }
        Cmd::Switch(SwitchCmd::Stats) => {
            let st: tandem_switch::host::SwitchStats = client.get("/v1/switch/stats").await?;
            if json {
                return print_json(&st);
            }
            print_switch_stats(&st);
        }
        Cmd::Ft(FtCmd::Rules(cmd)) => {
            let (name, change) = match cmd {
                RulesCmd::Show { name } => (name, None),
                RulesCmd::Set {
                    name,
                    profile,
                    rules,
                    mode,
                } => (
                    name,
                    Some(tandem_api::RulesChange::Set {
                        profile,
                        rules,
                        mode,
                    }),
                ),
                RulesCmd::Add {
                    name,
                    rule,
                    position,
                } => (name, Some(tandem_api::RulesChange::Add { rule, position })),
                RulesCmd::Del { name, position } => {
                    (name, Some(tandem_api::RulesChange::Del { position }))
                }
            };
            let path = format!("/v1/ft/{name}/rules");
            let table: tandem_api::OutputRules = match change {
                None => client.get(&path).await?,
                Some(c) => client.post(&path, &c).await?,
            };
            if json {
                return print_json(&table);
            }
            println!(
                "{}: mode {}, profile {}",
                table.vm,
                table.mode,
                table.profile.as_deref().unwrap_or("(custom)")
            );
            for (i, r) in table.rules.iter().enumerate() {
                println!("{:>4}  {r}", i + 1);
            }
            println!("      (then: forwarded and ARP pass; the VM's other output is held; SYN/FIN/RST always held)");
        }
        Cmd::Ft(FtCmd::Status { name }) => {
            let all: Vec<FtStatus> = match &name {
                Some(n) => client.get(&format!("/v1/ft/{n}")).await?,
                None => client.get("/v1/ft").await?,
            };
            if json {
                return print_json(&all);
            }
            print_ft(&all);
        }
        Cmd::Vm(VmCmd::Checkpoint { name, dir }) => {
            let dir = std::path::absolute(&dir)?;
            let r: serde_json::Value = client
                .post(
                    &format!("/v1/vms/{name}/checkpoint"),
                    &tandem_api::CheckpointRequest { dir },
                )
                .await?;
            if json {
                return print_json(&r);
            }
            println!(
                "checkpoint of {name} in {}: guest paused {:.1} ms, device state {} bytes, RAM {} bytes",
                r["dir"].as_str().unwrap_or("?"),
                r["pause_ms"].as_f64().unwrap_or(0.0),
                r["device_state_bytes"],
                r["ram_bytes"]
            );
        }
        Cmd::Vm(VmCmd::Restore { name, dir }) => {
            let dir = std::path::absolute(&dir)?;
            let vm: VmInfo = client
                .post(
                    &format!("/v1/vms/{name}/restore"),
                    &tandem_api::CheckpointRequest { dir },
                )
                .await?;
            if json {
                return print_json(&vm);
            }
            println!(
                "VM {} {} from the checkpoint (pid {})",
                vm.name,
                vm.state,
                vm.pid.map(|p| p.to_string()).unwrap_or("-".into())
            );
        }
        Cmd::Vm(VmCmd::List) => {
            let vms: Vec<VmSummary> = client.get("/v1/vms").await?;
            if json {
                return print_json(&vms);
            }
            println!(
                "{:<24} {:<10} {:>5} {:>8} {:<6} {:>8}",
                "NAME", "STATE", "VCPUS", "MEMORY", "ACCEL", "PID"
            );
            for v in vms {
                println!(
                    "{:<24} {:<10} {:>5} {:>7}M {:<6} {:>8}",
                    v.name,
                    v.state.as_str(),
                    v.vcpus,
                    v.memory_mib,
                    v.accel.as_deref().unwrap_or("-"),
                    v.pid.map(|p| p.to_string()).unwrap_or("-".into())
                );
            }
        }
        Cmd::Vm(VmCmd::Info { name }) => {
            let vm: VmInfo = client.get(&format!("/v1/vms/{name}")).await?;
            if json {
                return print_json(&vm);
            }
            print_info(&vm);
        }
        Cmd::Vm(VmCmd::Pause { name }) => {
            let vm: VmInfo = client.post(&format!("/v1/vms/{name}/pause"), &()).await?;
            if json {
                return print_json(&vm);
            }
            println!("VM {} {}", vm.name, vm.state);
        }
        Cmd::Vm(VmCmd::Resume { name }) => {
            let vm: VmInfo = client.post(&format!("/v1/vms/{name}/resume"), &()).await?;
            if json {
                return print_json(&vm);
            }
            println!("VM {} {}", vm.name, vm.state);
        }
        Cmd::Vm(VmCmd::Stop {
            name,
            timeout,
            force,
        }) => {
            if !json {
                eprintln!(
                    "stopping {name}: {}",
                    if force {
                        "killing QEMU".to_string()
                    } else {
                        format!(
                            "ACPI power-down (waiting up to {} for the guest)",
                            timeout
                                .map(|t| format!("{t} s"))
                                .unwrap_or("the spec's timeout".into())
                        )
                    }
                );
            }
            let vm: VmInfo = client
                .post(
                    &format!("/v1/vms/{name}/stop"),
                    &StopRequest {
                        timeout_s: timeout,
                        force,
                    },
                )
                .await?;
            if json {
                return print_json(&vm);
            }
            let how = vm
                .last_exit
                .as_ref()
                .map(|e| e.reason.clone())
                .unwrap_or_default();
            println!("VM {} {} ({how})", vm.name, vm.state);
        }
        Cmd::Vm(VmCmd::Destroy { name }) => {
            let v: serde_json::Value = client.delete(&format!("/v1/vms/{name}")).await?;
            if json {
                return print_json(&v);
            }
            println!("VM {name} destroyed");
        }
        Cmd::Vm(VmCmd::Console {
            name,
            follow,
            until,
            timeout,
        }) => {
            follow_console(
                &client,
                &name,
                follow || until.is_some(),
                until.as_deref(),
                timeout.map(Duration::from_secs),
            )
            .await?;
        }
    }
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn print_drill(reports: &[tandem_lab::RoundReport], seed: u64) {
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

fn print_ft(all: &[FtStatus]) {
    if all.is_empty() {
        println!("no protected VMs on this host");
        return;
    }
    for s in all {
        let role = match s.role {
            Some(FtRole::Primary) => "primary",
            Some(FtRole::Backup) => "backup",
            None => "-",
        };
        println!("{} ({role}, peer {})", s.vm, s.peer);
        println!(
            "  state:           {}{}",
            s.state,
            if s.detail.is_empty() {
                String::new()
            } else {
                format!(" — {}", s.detail)
            }
        );
        println!("  last committed:  epoch {}", s.last_committed);
        if s.role == Some(FtRole::Primary) {
            println!(
                "  epoch:           {} ms, {:.1} epochs/s, lag {} epochs",
                s.epoch_ms, s.epochs_per_s, s.lag_epochs
            );
            println!(
                "  pause:           p50 {:.2} ms, p99 {:.2} ms",
                s.pause_p50_ms, s.pause_p99_ms
            );
            println!(
                "  last epoch:      {} bytes, {} dirty pages",
                s.bytes_per_epoch, s.dirty_pages_last
            );
            println!("  tracker:         {}", s.tracker);
            if let Some(o) = &s.output {
                println!(
                    "  output:          {} ({}, {} rules); passed {} ({} clamped), held {}, released {}, discarded {}, overflow drops {}",
                    o.mode,
                    o.profile.as_deref().unwrap_or("custom"),
                    o.rules,
                    o.passed_frames,
                    o.clamped_frames,
                    o.held_frames,
                    o.released_frames,
                    o.discarded_frames,
                    o.overflow_drops
                );
                println!(
                    "  held now:        {} frames, {} bytes (high water {} / {}); hold p50 {:.1} ms, p99 {:.1} ms",
                    o.queued_frames,
                    o.queued_bytes,
                    o.high_water_frames,
                    o.high_water_bytes,
                    o.hold_p50_us as f64 / 1e3,
                    o.hold_p99_us as f64 / 1e3
                );
            }
        }
        if let Some(f) = &s.failover {
            println!(
                "  failover:        from epoch {}: detection {:.0} ms + fence wait {:.0} ms + restore {:.0} ms = {:.0} ms ({})",
                f.epoch, f.detection_ms, f.fence_wait_ms, f.restore_ms, f.total_ms, f.reason
            );
        }
    }
}

fn print_info(vm: &VmInfo) {
    println!("name:        {}", vm.name);
    println!("state:       {}", vm.state);
    println!("qmp status:  {}", vm.qmp_status.as_deref().unwrap_or("-"));
    println!("accelerator: {}", vm.accel.as_deref().unwrap_or("-"));
    println!(
        "pid:         {}",
        vm.pid.map(|p| p.to_string()).unwrap_or("-".into())
    );
    println!("serial log:  {}", vm.serial_log);
    println!("qmp socket:  {}", vm.qmp_socket);
    println!("ram file:    {}", vm.ram_file);
    if let Some(e) = &vm.last_exit {
        let status = e.describe_status();
        if e.reason.contains(&status) {
            println!("last exit:   {}", e.reason);
        } else {
            println!("last exit:   {} ({status})", e.reason);
        }
        if !e.qemu_log_tail.is_empty() {
            println!("  qemu log:");
            for l in &e.qemu_log_tail {
                println!("    {l}");
            }
        }
        if !e.serial_tail.is_empty() {
            println!("  console (last lines):");
            for l in e.serial_tail.iter().rev().take(5).rev() {
                println!("    {l}");
            }
        }
    }
}

async fn follow_console(
    client: &tandem_api::Client,
    name: &str,
    follow: bool,
    until: Option<&str>,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut offset = 0u64;
    // Keep the tail of what was printed so `until` matches across chunks.
    let mut window = String::new();
    let mut out = std::io::stdout().lock();
    loop {
        let chunk: ConsoleChunk = client
            .get(&format!("/v1/vms/{name}/console?offset={offset}"))
            .await?;
        if !chunk.data.is_empty() {
            out.write_all(chunk.data.as_bytes())?;
            out.flush()?;
            if let Some(needle) = until {
                window.push_str(&chunk.data);
                if window.contains(needle) {
                    return Ok(());
                }
                let keep = window.len().saturating_sub(needle.len().max(1) * 2 + 4096);
                let cut = (keep..window.len())
                    .find(|i| window.is_char_boundary(*i))
                    .unwrap_or(0);
                window.drain(..cut);
            }
        }
        offset = chunk.next_offset;
        if !follow {
            return Ok(());
        }
        if !chunk.active && chunk.data.is_empty() {
            if until.is_some() {
                bail!(
                    "VM {name} is not running and `{}` did not appear",
                    until.unwrap_or_default()
                );
            }
            return Ok(());
        }
        if let Some(t) = timeout {
            if started.elapsed() >= t {
                if until.is_some() {
                    bail!(
                        "`{}` did not appear on {name}'s console within {t:?}",
                        until.unwrap_or_default()
                    );
                }
                return Ok(());
            }
        }
        if chunk.data.is_empty() {
            tokio::time::sleep(Duration::from_millis(if std::io::stdout().is_terminal() {
                200
            } else {
                100
            }))
            .await;
        }
    }
}

fn print_switch_stats(st: &tandem_switch::host::SwitchStats) {
    println!(
        "{:<20} {:<14} {:<12} {:<4} {:>10} {:>12} {:>10} {:>12} {:>8}",
        "PORT", "KIND", "GROUP", "UP", "RX FRAMES", "RX BYTES", "TX FRAMES", "TX BYTES", "DROPS"
    );
    for p in &st.ports {
        let d = &p.counters.drops;
        let drops = d.total();
        println!(
            "{:<20} {:<14} {:<12} {:<4} {:>10} {:>12} {:>10} {:>12} {:>8}",
            p.name,
            p.kind,
            p.port_group,
            if p.up { "yes" } else { "no" },
            p.counters.rx_frames,
            p.counters.rx_bytes,
            p.counters.tx_frames,
            p.counters.tx_bytes,
            drops
        );
        if drops > 0 {
            let reasons = [
                ("malformed", d.malformed),
                ("bad-descriptor", d.bad_descriptor),
                ("queue-full", d.queue_full),
                ("vlan", d.vlan),
                ("shaped", d.shaped),
                ("security", d.security),
                ("learn-limit", d.learn_limit),
                ("gate", d.gate),
                ("no-buffer", d.no_buffer),
            ];
            let line: Vec<String> = reasons
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            println!("{:<20} drops: {}", "", line.join(" "));
        }
    }
    for (u, active) in &st.uplinks_active {
        println!(
            "uplink {u}: active member {}",
            active.as_deref().unwrap_or("none (no member has carrier)")
        );
    }
    println!("MAC table: {} entries", st.mac_table.len());
    for e in &st.mac_table {
        println!(
            "  vlan {:<5} {} port {:<4} age {:>4}s{}",
            e.vlan,
            e.mac,
            e.port,
            e.age_s,
            if e.pinned { " (VM)" } else { "" }
        );
    }
}
