//! `tandem bench <kind>`: options, one function per benchmark, and their
//! reports. Each report ends with the command line that reproduces it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use tandem_lab::{
    colobench, deploybench, migbench, ppsbench, DrillOptions, FtTimeouts, KillMode, RoundReport,
};

use crate::{print_json, tandemd_beside_lab};

mod cluster;
mod dvs;
mod restore;
mod tls;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// The switch alone between two VM ports: DPDK testpmd (virtio-user)
    /// sends on one port and receives on the other; Mpps and Gbit/s the
    /// switch delivers per frame size, median and p99 of per-second rates.
    /// Needs root; qemu-scripts/dpdk.sh provides testpmd and hugepages.
    SwitchPps(SwitchPpsArgs),
    /// tandem's vhost-user switch against tap + Linux bridge: host↔guest
    /// request/response latency and guest→guest TCP throughput, side by
    /// side in one run (pairs alternate each round).
    Switch(SwitchArgs),
    /// Output commit: request/response latency (a passed reply and a held
    /// one) and guest→client bulk throughput with output commit off,
    /// all-hold and classified, side by side, per epoch length.
    Output(OutputArgs),
    /// Guest throughput protected vs unprotected (CPU-bound and
    /// memory-dirtying work, timed from outside), per epoch length.
    Throughput(ThroughputArgs),
    /// One dirty-page collect with `scan` vs `soft-dirty`, side by side on
    /// the same memory, inside the guest (its kernel has soft-dirty bits;
    /// this host's may not). Median and p99 per size and write rate.
    Tracker(TrackerArgs),
    /// Failover time and epoch pause, side by side for several guest RAM
    /// sizes, over repeated drills (kill mode qemu). Reports median and p99.
    Failover(FailoverArgs),
    /// Failover restore (takeover decision → guest running on the backup)
    /// side by side for guests of several RAM and disk sizes, and the
    /// guest's work in the seconds after the failover against before.
    /// Median and p99 over fresh rounds (the primary's QEMU is killed).
    Restore(RestoreArgs),
    /// Epoch pause, tandem (per dirty-page tracker, `--tracker`) against
    /// QEMU's own COLO checkpointing on the same guest, one after the other
    /// per cell: p50/p99 from the primary QEMU's STOP/RESUME events,
    /// checkpoints per second, and tandem's collect inside the pause.
    /// Needs root and qemu-scripts/colo-qemu.sh (COLO is broken in QEMU
    /// 10.0; it unpacks Debian's 7.2 privately).
    Pause(PauseArgs),
    /// A tandem-manager and N light hosts (tandemds without VMs) on
    /// 127.0.0.1: join time per host, time to the first report, the
    /// manager's CPU and RSS at steady state, and how soon a host's changed
    /// inventory is visible (periodic, and after a manager restart).
    /// Median and p99. Needs root.
    Cluster(ClusterArgs),
    /// The replication link, plain TCP vs mutual TLS on 127.0.0.1, side by
    /// side in one run with the same guest and dirty rates: epoch pause
    /// p50/p99 (the primary QEMU's STOP/RESUME events), link and guest
    /// throughput, tandemd CPU, and the initial copy. Needs root.
    Tls(TlsArgs),
    /// The distributed switch (issue 16): a cut change → the host
    /// restored, reachable and resynced against the timeout (network
    /// namespaces, management through the host's switch); a committed
    /// change reaching N hosts; the manager down for a while with traffic
    /// between two hosts (frames lost, switch drops, back online). Median
    /// and p99. Needs root.
    Dvs(DvsArgs),
    /// Live migration, `tandem migrate` against plain QEMU migration with
    /// libvirt's defaults, on the same guest, side by side in one run, per
    /// dirtying level: total time, QEMU's downtime, the client-visible gap
    /// (a PING every 10 ms from a client namespace), bytes sent, the rung
    /// that finished it, and whether it converged. Median and p99. Two
    /// hosts in network namespaces per system, the migration link shaped
    /// with tc. Needs root.
    Migrate(MigrateArgs),
    /// Fan-out deployment (`tandem deploy`) on N hosts in network
    /// namespaces, in two topologies: a mesh of independent tbf-shaped
    /// links of unequal rates, and a rack (one shaped uplink per host).
    /// tandem's plan vs all-from-source vs a naive binary tree vs the lower
    /// bound, each a separate deployment over the same lab: makespan
    /// (median, p99), predicted vs actual, bytes the source sent, local
    /// clone time; and a link slowed 5x mid-deployment. Needs root.
    Deploy(DeployArgs),
}

// The argument groups carry no doc comments: a group's doc would become
// its subcommand's about text, which is the variant's above.

#[derive(Args, Debug)]
pub struct SwitchPpsArgs {
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
}

#[derive(Args, Debug)]
pub struct SwitchArgs {
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
}

#[derive(Args, Debug)]
pub struct OutputArgs {
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
}

#[derive(Args, Debug)]
pub struct ThroughputArgs {
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
}

#[derive(Args, Debug)]
pub struct TrackerArgs {
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
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
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
    /// defaults: 100 / 1500 / 2500). The takeover timeout must be at least
    /// the fence timeout + 220 ms (the shim lease's grace and poll) + two
    /// heartbeats.
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
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Guest sizes, `RAM[+DISK]` in MiB (DISK: a raw `bulk` disk of that
    /// size, filled with data, beside the guest's data disk).
    #[arg(long, value_delimiter = ',', default_value = "128,1024+4096")]
    sizes: Vec<restore::Size>,
    /// Rounds per size (each a fresh pair of tandemds and a full copy).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds of guest work timed after each failover (and once per size
    /// before protection); 0 times none.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    #[arg(long, default_value_t = 50)]
    epoch_ms: u64,
    /// Kill the primary right after the backup stands by, while the
    /// backup's filesystem still writes back the initial copy (by default
    /// it is flushed first: a backup in its steady state).
    #[arg(long)]
    no_settle: bool,
    #[arg(
        long,
        env = "TANDEM_IMAGE_DIR",
        default_value = "/var/lib/tandem/images"
    )]
    image_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct PauseArgs {
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
    /// tandem's dirty-page trackers, each measured in every cell (COLO
    /// once): scan, soft-dirty, uffd or auto.
    #[arg(long, value_delimiter = ',', default_value = "scan")]
    tracker: Vec<String>,
    #[arg(
        long,
        env = "TANDEM_IMAGE_DIR",
        default_value = "/var/lib/tandem/images"
    )]
    image_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// Hosts to join and run (1..=256).
    #[arg(long, default_value_t = 32)]
    hosts: usize,
    /// Seconds of steady state measured (only the agents' heartbeats).
    #[arg(long, default_value_t = 30)]
    window_s: u64,
    /// Bound on each inventory measurement, seconds (the agent sends its
    /// inventory every 60 s).
    #[arg(long, default_value_t = 90)]
    refresh_timeout_s: u64,
    #[arg(
        long,
        env = "TANDEM_IMAGE_DIR",
        default_value = "/var/lib/tandem/images"
    )]
    image_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct DvsArgs {
    /// Which measurements: cut, commit, down.
    #[arg(long, value_delimiter = ',', default_value = "cut,commit,down")]
    which: Vec<dvs::Which>,
    /// Cut runs (each: a change that cuts the canary's management).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The cut transaction's timeout, seconds (5..=60).
    #[arg(long, default_value_t = 5)]
    timeout_s: u32,
    /// Hosts joined for the commit measurement (1..=200).
    #[arg(long, default_value_t = 32)]
    hosts: usize,
    /// Committed changes measured over all hosts.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Seconds the manager is down (with traffic between two hosts).
    #[arg(long, default_value_t = 60)]
    down_s: u64,
    #[arg(
        long,
        env = "TANDEM_IMAGE_DIR",
        default_value = "/var/lib/tandem/images"
    )]
    image_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct TlsArgs {
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    #[arg(long, default_value_t = 50)]
    epoch_ms: u64,
    /// Guest memory dirtied per second, MiB/s (0: idle): one `DIRTY`
    /// request per epoch.
    #[arg(long, value_delimiter = ',', default_value = "0,16,64")]
    dirty: Vec<u64>,
    /// Seconds measured per link and dirty rate (per round).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds; the order of the links alternates.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// The links compared: tcp (no identity) and tls (a standalone pair).
    #[arg(long, value_delimiter = ',', default_value = "tcp,tls")]
    link: Vec<tls::Link>,
    /// The QEMU tandemd runs the guest on.
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    #[arg(
        long,
        env = "TANDEM_IMAGE_DIR",
        default_value = "/var/lib/tandem/images"
    )]
    image_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Guest memory rewritten per second, MiB/s (0: idle): the guest
    /// service's `DIRTY` over its whole 32 MiB buffer, paced.
    #[arg(long, value_delimiter = ',', default_value = "0,16,64")]
    dirty_mib_s: Vec<u64>,
    /// Migrations per system and dirtying level (the guest moves back and
    /// forth).
    #[arg(long, default_value_t = 5)]
    runs: u32,
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// The migration link's speed, MiB/s (tc on both systems' link; also
    /// `tandem migrate --bandwidth`). Default: QEMU's own 128 (≈ 1 GbE).
    #[arg(long, default_value_t = 128)]
    bandwidth: u64,
    /// A plain QEMU migration still running after this many seconds is
    /// cancelled and counted as not converged (libvirt has no bound).
    #[arg(long, default_value_t = 30)]
    bound_s: u64,
    /// The QEMU of the plain side (tandemd runs its default).
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    #[arg(long, default_value = "/usr/share/qemu/qboot.rom")]
    qboot_rom: PathBuf,
    #[arg(
        long,
        env = "TANDEM_IMAGE_DIR",
        default_value = "/var/lib/tandem/images"
    )]
    image_dir: PathBuf,
    /// Protect tandem's guest (fault tolerance, epoch 50 ms, output commit
    /// classified) to a third tandemd for the whole run: each migration
    /// moves the protection, and the destination's time to its first
    /// commit to the backup is reported.
    #[arg(long)]
    protected: bool,
    /// The network following the guest: DHCP and IGMP snooping with IP
    /// source guard on tandem's switches, numbered unicast and multicast
    /// streams to the guest counted, the time until the destination holds
    /// the guest's DHCP binding; a third system, tandem without the
    /// migrated flag (needs tandemd built with `--features
    /// fault-injection`), beside plain QEMU + Linux bridge.
    #[arg(long)]
    netfollow: bool,
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// Hosts in all: the source and N-1 targets (2..=32).
    #[arg(long, default_value_t = 8)]
    hosts: usize,
    /// The template's size, MiB.
    #[arg(long, default_value_t = 64)]
    image_mib: u64,
    /// Deployments per topology and strategy.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// mesh, rack or both.
    #[arg(long, default_value = "both")]
    topology: deploybench::Topologies,
    /// Draws the mesh's link rates.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// R, Mbit/s: each rack uplink; mesh links are drawn in [R/4, R].
    #[arg(long, default_value_t = 200.0)]
    rate_mbit: f64,
    /// Where the labs' directories (and the hosts' image directories) go.
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
}

/// Benchmarks drive their own runtimes and processes: no async runtime here.
pub fn run(cmd: BenchCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::SwitchPps(a) => switch_pps(a, json),
        BenchCmd::Switch(a) => switch(a, json),
        BenchCmd::Output(a) => output(a, json),
        BenchCmd::Throughput(a) => throughput(a, json),
        BenchCmd::Tracker(a) => tracker(a, json),
        // Its table is printed with `--json` too, as it always was.
        BenchCmd::Failover(a) => failover(a),
        BenchCmd::Restore(a) => restore_bench(a, json),
        BenchCmd::Pause(a) => pause(a, json),
        BenchCmd::Cluster(a) => cluster_bench(a, json),
        BenchCmd::Tls(a) => tls_bench(a, json),
        BenchCmd::Dvs(a) => dvs_bench(a, json),
        BenchCmd::Migrate(a) => migrate_bench(a, json),
        BenchCmd::Deploy(a) => deploy_bench(a, json),
    }
}

fn deploy_bench(a: DeployArgs, json: bool) -> anyhow::Result<()> {
    let o = deploybench::Options {
        hosts: a.hosts,
        image_mib: a.image_mib,
        runs: a.runs,
        topologies: a.topology,
        seed: a.seed,
        rate_mbit: a.rate_mbit,
        per_host: 2,
        tandem: cluster::beside_lab("tandem")?,
        tandemd: tandemd_beside_lab()?,
        manager: cluster::beside_lab("tandem-manager")?,
        work_dir: a.work_dir,
    };
    let r = deploybench::run(&o, say)?;
    if json {
        return print_json(&r);
    }
    deploybench::print(&r);
    Ok(())
}

fn say(m: &str) {
    eprintln!("bench: {m}");
}

/// `1,2,3` for a reproduce line.
fn join<T: ToString>(v: &[T]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The drill site every benchmark builds on: one guest of `memory_mib`,
/// 50 ms epochs, output commit as the drill runs it.
fn bench_options(memory_mib: u32, image_dir: &Path) -> anyhow::Result<DrillOptions> {
    Ok(DrillOptions {
        rounds: 1,
        kill: None,
        seed: 1,
        epoch_ms: 50,
        memory_mib,
        output: "classified".into(),
        profile: "bulk-tcp".into(),
        unsafe_no_clamp: false,
        tandemd: tandemd_beside_lab()?,
        image_dir: image_dir.to_path_buf(),
        work_dir: PathBuf::from("/tmp"),
        timeouts: Default::default(),
    })
}

/// `--pin SWITCH_CPU,TESTPMD_CPU` or `none`.
fn parse_pin(pin: &str) -> anyhow::Result<Option<(usize, usize)>> {
    Ok(match pin {
        "none" => None,
        p => {
            let (s, g) = p
                .split_once(',')
                .and_then(|(s, g)| Some((s.trim().parse().ok()?, g.trim().parse().ok()?)))
                .context("--pin: SWITCH_CPU,TESTPMD_CPU (e.g. 0,1) or none")?;
            Some((s, g))
        }
    })
}

/// `qemu-scripts/dpdk.sh` in the current directory, else in the source
/// tree this binary was built from.
fn default_dpdk_script() -> PathBuf {
    let here = PathBuf::from("qemu-scripts/dpdk.sh");
    if here.is_file() {
        here
    } else {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../qemu-scripts/dpdk.sh"
        ))
    }
}

fn switch_pps(a: SwitchPpsArgs, json: bool) -> anyhow::Result<()> {
    let generator = a
        .generator
        .parse::<ppsbench::Generator>()
        .map_err(|e| anyhow::anyhow!("--generator: {e}"))?;
    let pin_cpus = parse_pin(&a.pin)?;
    let opts = ppsbench::PpsOptions {
        seconds: a.seconds,
        sizes: a.sizes.clone(),
        pin: pin_cpus,
        generator,
        dpdk_script: a.dpdk_script.clone().unwrap_or_else(default_dpdk_script),
        work_dir: PathBuf::from("/tmp"),
    };
    let rows = ppsbench::switch_pps(&opts, say)?;
    if json {
        return print_json(&rows);
    }
    let pinned = match pin_cpus {
        Some((s, g)) => format!("switch (all its threads) on CPU {s}, both testpmd on CPU {g}"),
        None => "nothing pinned".into(),
    };
    let seconds = a.seconds;
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
    println!(
        "reproduce: tandem bench switch-pps --seconds {seconds} --sizes {} --pin {} --generator {}",
        join(&a.sizes),
        a.pin,
        generator.name()
    );
    Ok(())
}

fn switch(a: SwitchArgs, json: bool) -> anyhow::Result<()> {
    let SwitchArgs {
        rounds,
        requests,
        bulk_ms,
        memory_mib,
        image_dir,
    } = a;
    let opts = bench_options(memory_mib, &image_dir)?;
    let rows = tandem_lab::switchbench::switch_vs_bridge(&opts, rounds, requests, bulk_ms, say)?;
    if json {
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
    Ok(())
}

fn output(a: OutputArgs, json: bool) -> anyhow::Result<()> {
    let OutputArgs {
        epoch_ms,
        requests,
        bulk_ms,
        memory_mib,
        image_dir,
    } = a;
    let opts = bench_options(memory_mib, &image_dir)?;
    let rows = tandem_lab::bench::output(&opts, &epoch_ms, requests, bulk_ms, say)?;
    if json {
        return print_json(&rows);
    }
    println!("\noutput commit ({memory_mib} MiB guest; {requests} round trips per kind; bulk-tcp profile, PONG passed, PUT replies held)");
    println!(
        "{:>6} {:>11} {:>14} {:>14} {:>14} {:>14} {:>11}",
        "epoch", "mode", "pass rr p50", "pass rr p99", "hold rr p50", "hold rr p99", "bulk Mbit/s"
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
        join(&epoch_ms)
    );
    Ok(())
}

fn throughput(a: ThroughputArgs, json: bool) -> anyhow::Result<()> {
    let ThroughputArgs {
        epoch_ms,
        spin,
        dirty,
        reps,
        memory_mib,
        image_dir,
    } = a;
    let opts = bench_options(memory_mib, &image_dir)?;
    let rows = tandem_lab::bench::throughput(&opts, &epoch_ms, spin, dirty, reps, say)?;
    if json {
        return print_json(&rows);
    }
    println!(
        "\nguest throughput, protected vs unprotected ({memory_mib} MiB guest, median of {reps})"
    );
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
        join(&epoch_ms)
    );
    Ok(())
}

fn tracker(a: TrackerArgs, json: bool) -> anyhow::Result<()> {
    let TrackerArgs {
        mib,
        pages,
        epochs,
        memory_mib,
        image_dir,
    } = a;
    let opts = bench_options(memory_mib, &image_dir)?;
    let rows = tandem_lab::bench::tracker(&opts, &mib, &pages, epochs, say)?;
    if json {
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
    println!(
        "reproduce: tandem bench tracker --mib {} --pages {} --epochs {epochs} --memory-mib {memory_mib}",
        join(&mib),
        join(&pages)
    );
    Ok(())
}

fn pause(a: PauseArgs, json: bool) -> anyhow::Result<()> {
    for t in &a.tracker {
        if !["scan", "soft-dirty", "uffd", "auto"].contains(&t.as_str()) {
            anyhow::bail!(
                "--tracker: unknown tracker {t:?} (expected scan, soft-dirty, uffd or auto)"
            );
        }
    }
    let opts = colobench::PauseOptions {
        memory_mib: a.memory_mib.clone(),
        epoch_ms: a.epoch_ms,
        dirty_mib_s: a.dirty.clone(),
        seconds: a.seconds,
        seed: a.seed,
        tandemd: tandemd_beside_lab()?,
        qemu: a.qemu.clone(),
        colo_qemu: a.colo_qemu.clone(),
        colo_shim: (a.colo_shim != "none").then(|| PathBuf::from(&a.colo_shim)),
        image_dir: a.image_dir.clone(),
        work_dir: PathBuf::from("/tmp"),
        trackers: a.tracker.clone(),
    };
    let r = colobench::pause_vs_colo(&opts, say)?;
    if json {
        return print_json(&r);
    }
    print_pause(&a, &r);
    Ok(())
}

fn print_pause(a: &PauseArgs, r: &colobench::PauseReport) {
    let PauseArgs {
        epoch_ms,
        seconds,
        seed,
        ..
    } = a;
    println!(
        "\nepoch pause, tandem ({}) vs QEMU COLO, epoch = x-checkpoint-delay = {epoch_ms} ms, {seconds} s per system and cell",
        a.tracker.join(", ")
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
        "{:>5} {:>6} {:>10} | {:>17} | {:>27} {:>8} {:>8} | {:>27} {:>8} {:>8} | {:>16}",
        "RAM",
        "dirty",
        "tracker",
        "collect p50 / p99",
        "tandem pause p50 / p99 ms",
        "ckpt/s",
        "dirtied",
        "COLO pause p50 / p99 ms",
        "ckpt/s",
        "dirtied",
        "tandem/COLO p50, p99"
    );
    for row in &r.rows {
        let collect = match (row.tandem.collect_p50_ms, row.tandem.collect_p99_ms) {
            (Some(p50), Some(p99)) => format!("{p50:>7.2} / {p99:>7.2}"),
            _ => "-".to_string(),
        };
        println!(
            "{:>5} {:>6} {:>10} | {:>17} | {:>13.2} / {:>11.2} {:>8.1} {:>8.1} | {:>13.2} / {:>11.2} {:>8.1} {:>8.1} | {:>8.2}, {:>6.2}",
            row.memory_mib,
            row.dirty_mib_s,
            row.tracker,
            collect,
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
    println!("(RAM in MiB; dirty: offered MiB/s; dirtied: MiB/s the guest got done; pause from the primary QEMU's STOP/RESUME events; collect: the dirty-page collect inside tandem's pause, ms, from tandemd's epoch log; each cell's COLO run is shared by its tracker rows)");
    for row in &r.rows {
        if let Some(note) = &row.tandem.tracker_note {
            println!(
                "{} MiB / {} MiB/s, tracker {}: {note}",
                row.memory_mib, row.dirty_mib_s, row.tracker
            );
        }
    }
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
    println!(
        "reproduce: tandem bench pause --memory-mib {} --epoch-ms {epoch_ms} --dirty {} --tracker {} --seconds {seconds} --seed {seed}",
        join(&a.memory_mib),
        join(&a.dirty),
        a.tracker.join(",")
    );
}

fn cluster_bench(a: ClusterArgs, json: bool) -> anyhow::Result<()> {
    let o = cluster::Options {
        hosts: a.hosts,
        window_s: a.window_s,
        refresh_timeout_s: a.refresh_timeout_s,
        tandemd: tandemd_beside_lab()?,
        image_dir: a.image_dir,
        work_dir: PathBuf::from("/tmp"),
    };
    let r = cluster::run(&o, say)?;
    if json {
        return print_json(&r);
    }
    cluster::print(&o, &r);
    Ok(())
}

fn dvs_bench(a: DvsArgs, json: bool) -> anyhow::Result<()> {
    let o = dvs::Options {
        which: a.which,
        runs: a.runs,
        timeout_s: a.timeout_s,
        hosts: a.hosts,
        changes: a.changes,
        down_s: a.down_s,
        tandemd: tandemd_beside_lab()?,
        image_dir: a.image_dir,
        work_dir: PathBuf::from("/tmp"),
    };
    let r = dvs::run(&o, say)?;
    if json {
        return print_json(&r);
    }
    dvs::print(&o, &r);
    Ok(())
}

fn tls_bench(a: TlsArgs, json: bool) -> anyhow::Result<()> {
    let o = tls::Options {
        memory_mib: a.memory_mib,
        epoch_ms: a.epoch_ms,
        dirty_mib_s: a.dirty,
        seconds: a.seconds,
        rounds: a.rounds,
        links: a.link,
        qemu: a.qemu,
        tandemd: tandemd_beside_lab()?,
        image_dir: a.image_dir,
        work_dir: PathBuf::from("/tmp"),
    };
    let r = tls::run(&o, say)?;
    if json {
        return print_json(&r);
    }
    tls::print(&o, &r);
    Ok(())
}

fn restore_bench(a: RestoreArgs, json: bool) -> anyhow::Result<()> {
    let opts = restore::Options {
        sizes: a.sizes.clone(),
        rounds: a.rounds,
        seconds: a.seconds,
        epoch_ms: a.epoch_ms,
        settle: !a.no_settle,
        tandemd: tandemd_beside_lab()?,
        image_dir: a.image_dir.clone(),
        work_dir: PathBuf::from("/tmp"),
    };
    let rows = restore::run(&opts, say)?;
    if json {
        return print_json(&rows);
    }
    let RestoreArgs {
        rounds,
        seconds,
        epoch_ms,
        no_settle,
        ..
    } = a;
    println!(
        "\nfailover restore (takeover decision -> guest running on the backup), {rounds} rounds per size, {}; guest work: DIRTY (MiB/s written, wall time), {seconds} s",
        if no_settle {
            "killed right after the backup stood by"
        } else {
            "killed once the backup's initial copy was written back"
        }
    );
    println!(
        "{:>10} {:>12} {:>12} {:>14} {:>14} {:>14} {:>14} {:>16}",
        "RAM+disk",
        "restore p50",
        "restore p99",
        "detection p50",
        "copy s p50",
        "before MiB/s",
        "after MiB/s",
        "1st request ms"
    );
    for r in &rows {
        let p50 = |f: &dyn Fn(&restore::Round) -> f64| {
            let mut v: Vec<f64> = r.rounds.iter().map(f).collect();
            tandem_lab::stats_ms(&mut v, 50.0)
        };
        println!(
            "{:>10} {:>9.0} ms {:>9.0} ms {:>11.0} ms {:>14.1} {:>14.1} {:>14.1} {:>16.0}",
            r.size.to_string(),
            r.restore_p50_ms,
            r.restore_p99_ms,
            p50(&|x| x.detection_ms),
            p50(&|x| x.protect_s),
            r.before_mib_s,
            r.after_p50_mib_s,
            r.first_request_p50_ms
        );
    }
    println!("(copy s: protect -> the backup stands by, the initial copy; before: the guest on the primary before protection, RAM on tmpfs; after: on the backup after the failover, RAM in the replica's file, p50 over rounds)");
    println!(
        "reproduce: tandem bench restore --sizes {} --rounds {rounds} --seconds {seconds} --epoch-ms {epoch_ms}{}",
        join(&a.sizes),
        if no_settle { " --no-settle" } else { "" }
    );
    Ok(())
}

fn failover(a: FailoverArgs) -> anyhow::Result<()> {
    let kill_mode = a
        .kill
        .parse::<KillMode>()
        .map_err(|e| anyhow::anyhow!("--kill: {e}"))?;
    let mut rows = Vec::new();
    for &mem in &a.memory_mib {
        let opts = DrillOptions {
            rounds: a.rounds,
            kill: Some(kill_mode),
            seed: a.seed,
            epoch_ms: a.epoch_ms,
            timeouts: FtTimeouts {
                heartbeat_ms: a.heartbeat_ms,
                fence_timeout_ms: a.fence_timeout_ms,
                takeover_timeout_ms: a.takeover_timeout_ms,
            },
            ..bench_options(mem, &a.image_dir)?
        };
        eprintln!("bench: {} drills with a {mem} MiB guest", a.rounds);
        let r = tandem_lab::run(&opts, say)?;
        rows.push((mem, r));
    }
    print_failover(&a, &rows);
    Ok(())
}

fn print_failover(a: &FailoverArgs, rows: &[(u32, Vec<RoundReport>)]) {
    let FailoverArgs {
        rounds,
        epoch_ms,
        seed,
        heartbeat_ms,
        fence_timeout_ms,
        takeover_timeout_ms,
        kill,
        ..
    } = a;
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
    for (mem, r) in rows {
        let col = |f: &dyn Fn(&RoundReport) -> f64| {
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
        join(&a.memory_mib)
    );
}

fn migrate_bench(a: MigrateArgs, json: bool) -> anyhow::Result<()> {
    let opts = migbench::MigOptions {
        dirty_mib_s: a.dirty_mib_s.clone(),
        runs: a.runs,
        memory_mib: a.memory_mib,
        bandwidth_mib_s: a.bandwidth,
        bound_s: a.bound_s,
        tandem: cluster::beside_lab("tandem")?,
        tandemd: tandemd_beside_lab()?,
        qemu: a.qemu.clone(),
        qboot_rom: a.qboot_rom.clone(),
        image_dir: a.image_dir.clone(),
        work_dir: PathBuf::from("/tmp"),
        protected: a.protected,
        netfollow: a.netfollow,
    };
    let r = migbench::migrate_vs_plain(&opts, say)?;
    if json {
        return print_json(&r);
    }
    print_migrate(&a, &r);
    Ok(())
}

fn print_migrate(a: &MigrateArgs, r: &migbench::MigReport) {
    let v = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.0}"));
    let pair = |p50: Option<f64>, p99: Option<f64>| format!("{} / {}", v(p50), v(p99));
    println!(
        "\nlive migration, tandem migrate{} vs plain QEMU (libvirt's defaults); {} MiB TCG guest, link {} MiB/s, {} runs per cell",
        if r.protected { " (protected VM)" } else { "" },
        r.memory_mib,
        r.bandwidth_mib_s,
        r.runs
    );
    println!("QEMU: {}", r.qemu);
    println!("tandem: {}", r.tandem_settings);
    println!("plain:  {}", r.plain_settings);
    println!("load:   {}", r.load);
    // The first-commit column only for a protected run.
    let commit_col = |s: String| {
        if r.protected {
            format!(" {s:>11} |")
        } else {
            String::new()
        }
    };
    println!(
        "{:>5} {:<6} {:>5} | {:>13} | {:>11} |{} {:>11} {:>6} | {:>11} | {:>13} | rungs",
        "dirty",
        "system",
        "conv",
        "total ms",
        "downtime ms",
        commit_col("1st commit".into()),
        "gap ms",
        "before",
        "sent MiB",
        "dirty MiB/s"
    );
    println!(
        "{:>5} {:<6} {:>5} | {:>13} | {:>11} |{} {:>11} {:>6} | {:>11} | {:>13} |",
        "MiB/s",
        "",
        "",
        "p50 / p99",
        "p50 / p99",
        commit_col("p50 / p99".into()),
        "p50 / p99",
        "p50",
        "p50 / p99",
        "load / QEMU"
    );
    for c in &r.cells {
        for (name, side) in sides(c) {
            let s = &side.stats;
            let rungs = s
                .rungs
                .iter()
                .map(|(k, n)| format!("{k} x{n}"))
                .collect::<Vec<_>>()
                .join(", ");
            println!(
                "{:>5} {:<6} {:>5} | {:>13} | {:>11} |{} {:>11} {:>6} | {:>11} | {:>13} | {}",
                c.dirty_asked_mib_s,
                name,
                format!("{}/{}", s.converged, s.runs),
                pair(s.total_p50_ms, s.total_p99_ms),
                pair(s.downtime_p50_ms, s.downtime_p99_ms),
                commit_col(if name == "tandem" {
                    pair(s.first_commit_p50_ms, s.first_commit_p99_ms)
                } else {
                    "-".into()
                }),
                pair(s.gap_p50_ms, s.gap_p99_ms),
                v(s.gap_before_p50_ms),
                pair(s.sent_p50_mib, s.sent_p99_mib),
                format!(
                    "{} / {}",
                    s.dirtied_p50_mib_s
                        .map_or_else(|| "-".to_string(), |d| format!("{d:.1}")),
                    s.dirty_seen_p50_mib_s
                        .map_or_else(|| "-".to_string(), |d| format!("{d:.1}"))
                ),
                rungs
            );
        }
    }
    println!("(converged runs only; p99 is the nearest rank, the maximum of a few runs; gap: longest time between two PING replies across the migration, before: the same under the load just before it; dirty: achieved, p50 over runs: load = the distinct pages the guest rewrote per second by the spacing of the DIRTY requests it answered, QEMU = its highest dirty-pages-rate x page size during the migration (- when it finished before QEMU's first reading, which takes a second); total: tandem the whole `tandem migrate`, plain the destination's start to its cont)");
    if r.protected {
        println!("(1st commit: tandem's protected guest, from the end of the stream to the destination's first commit to the backup, its output held until then; the report's first_commit_ms)");
    }
    if r.netfollow {
        print_netfollow(r);
    }
    for c in &r.cells {
        for (name, side) in sides(c) {
            for run in &side.runs {
                if let Some(e) = &run.error {
                    println!(
                        "{} MiB/s {name} run {}: error: {e}",
                        c.dirty_asked_mib_s, run.run
                    );
                } else if let Some(n) = &run.note {
                    println!("{} MiB/s {name} run {}: {n}", c.dirty_asked_mib_s, run.run);
                } else if !run.served_after {
                    println!("{} MiB/s {name} run {}: the client was not served within 10 s after the migration", c.dirty_asked_mib_s, run.run);
                }
            }
        }
    }
    println!(
        "reproduce: tandem bench migrate --dirty-mib-s {} --runs {} --memory-mib {} --bandwidth {} --bound-s {}{}{}",
        join(&a.dirty_mib_s),
        a.runs,
        a.memory_mib,
        a.bandwidth,
        a.bound_s,
        if a.protected { " --protected" } else { "" },
        if a.netfollow { " --netfollow" } else { "" }
    );
}

/// A cell's systems in print order.
fn sides(c: &migbench::Cell) -> Vec<(&'static str, &migbench::Side)> {
    let mut v = vec![("tandem", &c.tandem)];
    if let Some(n) = &c.noflag {
        v.push(("noflag", n));
    }
    v.push(("plain", &c.plain));
    v
}

fn print_netfollow(r: &migbench::MigReport) {
    let v = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.0}"));
    let pair = |p50: Option<f64>, p99: Option<f64>| format!("{} / {}", v(p50), v(p99));
    println!("\nthe network following the guest (--netfollow): streams every 10 ms from the client's namespace");
    println!(
        "{:>5} {:<6} | {:>13} | {:>13} | {:>18} | {:>8} | {:>18} |",
        "dirty",
        "system",
        "unicast lost",
        "unicast late",
        "multicast gap ms",
        "mc not",
        "binding back ms"
    );
    println!(
        "{:>5} {:<6} | {:>13} | {:>13} | {:>18} | {:>8} | {:>18} |",
        "MiB/s", "", "p50 / p99", "p50 / p99", "p50 / p99", "back", "p50 / p99 (none)"
    );
    for c in &r.cells {
        for (name, side) in sides(c) {
            let Some(n) = &side.stats.net else { continue };
            println!(
                "{:>5} {:<6} | {:>13} | {:>13} | {:>18} | {:>8} | {:>18} |",
                c.dirty_asked_mib_s,
                name,
                pair(n.unicast_lost_p50, n.unicast_lost_p99),
                pair(n.unicast_late_p50, n.unicast_late_p99),
                pair(n.multicast_gap_p50_ms, n.multicast_gap_p99_ms),
                format!("{}/{}", n.multicast_not_back, side.stats.converged),
                if n.binding_kept {
                    format!(
                        "{} ({})",
                        pair(n.binding_p50_ms, n.binding_p99_ms),
                        n.binding_missing
                    )
                } else {
                    "- (keeps none)".to_string()
                }
            );
        }
    }
    println!("(unicast lost: numbered datagrams to the guest that never arrived (skipped and not delivered later, or not delivered by the end of a {} s window after the migration); late: arrived after newer ones (held during the switchover); multicast gap: the group's datagrams lost x 10 ms, over runs where it flowed before and again after; mc not back: runs where it did not flow again within the window; binding back: after the migrate command returned, until the destination's switch held the guest's DHCP binding, bounded at {} s, (n) runs without one. noflag: tandem with every arriving VM associated as new (--fault-association new), no source guard)",
        migbench::NETFOLLOW_SETTLE_S, migbench::NETFOLLOW_BINDING_BOUND_S);
}
