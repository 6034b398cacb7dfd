//! Fault tolerance: `tandem protect`, `unprotect`, `failover`, and
//! `tandem ft …` (status, output-commit rules).

use clap::{Args, Subcommand};
use tandem_api::{FailoverReport, FtRole, FtStatus, ProtectRequest};

use crate::print_json;

// No doc comment: it would become `tandem protect`'s about text, which is
// the `Protect` variant's.
#[derive(Args, Debug)]
pub struct ProtectArgs {
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
    /// Dirty-page tracker: auto (tandemd's --ft-tracker), scan,
    /// soft-dirty or uffd.
    #[arg(long)]
    tracker: Option<String>,
    /// The least generation to protect under. `tandem migrate` passes the
    /// source's + 1 itself; by hand only to finish a protected VM's
    /// migration whose CLI died after the stream (`tandem ft status`
    /// on the destination says so), with the source's generation + 1.
    #[arg(long)]
    generation: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum FtCmd {
    /// Replication state of protected VMs on this host (either role).
    Status { name: Option<String> },
    /// Output-commit rules of a protected VM (on its primary).
    #[command(subcommand)]
    Rules(RulesCmd),
}

#[derive(Subcommand, Debug)]
pub enum RulesCmd {
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

/// `tandem protect`. The output mode, profile, rules and tracker are
/// validated by tandemd, which names the bad value.
pub async fn protect(
    client: &tandem_api::Client,
    a: ProtectArgs,
    json: bool,
) -> anyhow::Result<()> {
    let name = a.name;
    if a.output == "off" {
        eprintln!(
            "WARNING: output commit OFF: clients can see output that a failover will contradict"
        );
    }
    let st: FtStatus = client
        .post(
            &format!("/v1/vms/{name}/protect"),
            &ProtectRequest {
                backup: a.backup,
                epoch_ms: Some(a.epoch_ms),
                output_mode: Some(a.output),
                profile: a.profile,
                rules: (!a.rules.is_empty()).then_some(a.rules),
                hold_max_frames: a.hold_max_frames,
                hold_max_bytes: a.hold_max_bytes,
                tracker: a.tracker,
                unsafe_no_clamp: false,
                generation: a.generation,
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
    Ok(())
}

pub async fn unprotect(client: &tandem_api::Client, name: &str, json: bool) -> anyhow::Result<()> {
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
    Ok(())
}

pub async fn failover(client: &tandem_api::Client, name: &str, json: bool) -> anyhow::Result<()> {
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
    Ok(())
}

pub async fn run(client: &tandem_api::Client, cmd: FtCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        FtCmd::Status { name } => {
            let all: Vec<FtStatus> = match &name {
                Some(n) => client.get(&format!("/v1/ft/{n}")).await?,
                None => client.get("/v1/ft").await?,
            };
            if json {
                return print_json(&all);
            }
            print_ft(&all);
            Ok(())
        }
        FtCmd::Rules(cmd) => rules(client, cmd, json).await,
    }
}

async fn rules(client: &tandem_api::Client, cmd: RulesCmd, json: bool) -> anyhow::Result<()> {
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
        RulesCmd::Del { name, position } => (name, Some(tandem_api::RulesChange::Del { position })),
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
    Ok(())
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
            print_primary(s);
        }
        if let Some(f) = &s.failover {
            println!(
                "  failover:        from epoch {}: detection {:.0} ms + fence wait {:.0} ms + restore {:.0} ms = {:.0} ms ({})",
                f.epoch, f.detection_ms, f.fence_wait_ms, f.restore_ms, f.total_ms, f.reason
            );
        }
    }
}

/// The primary's lines of `ft status`: epochs, pauses, tracker, output.
fn print_primary(s: &FtStatus) {
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
