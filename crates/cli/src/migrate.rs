//! `tandem migrate`: live migration of a running VM to another tandemd.
//!
//! The CLI drives the two daemons the way libvirt's client drives a
//! migration: the destination defines the VM with the source's identity
//! and starts a QEMU that listens; the source migrates into it and walks
//! the convergence ladder; when QEMU has finished, the source waits,
//! paused, until the destination is seen running the guest, and only
//! then removes its copy (or resumes, if the destination did not take
//! it). Under `--json`, standard output carries one JSON object per line:
//! the progress events, then the final report. Every failure leaves the VM running on the source and nothing on
//! the destination.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tandem_api::{
    Client, IncomingMigrationReply, IncomingMigrationRequest, MigrateRequest, MigrationConfirm,
    MigrationDisksRequest, MigrationPhase, MigrationProtection, MigrationReport, MigrationSource,
    VmInfo, VmState,
};
use tandem_progress::{Event, Mode, Reporter, Tracker};

/// Under `--json` the progress events are JSON lines on standard output;
/// the final report is the last line, compact like them.
fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The VM to migrate (on this host, or on `--remote`'s).
    pub name: String,
    /// The destination host of the cluster: NAME (the manager says where
    /// its host API is) or NAME@HOST:PORT; reached over mutual TLS with the
    /// operator identity (`--remote-identity`).
    #[arg(long, required_unless_present_any = ["cancel", "status", "to_socket"], conflicts_with = "to_socket")]
    pub to: Option<crate::remote::RemoteArg>,
    /// A destination tandemd's API socket on this machine instead.
    #[arg(long = "to-socket")]
    pub to_socket: Option<PathBuf>,
    /// Where the destination's QEMU listens for the stream: HOST:PORT
    /// (port 0: any free port). Default: with `--to`, the destination's
    /// host API address with port 0; with `--to-socket`, 127.0.0.1:0.
    #[arg(long)]
    pub listen: Option<String>,
    /// The downtime limit precopy starts with (QEMU's default: 300).
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// The most downtime the convergence ladder may allow (default 2000;
    /// equal to --downtime-ms to keep the limit fixed).
    #[arg(long)]
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth in MiB/s (QEMU's default: 128).
    #[arg(long)]
    pub bandwidth: Option<u64>,
    /// Allow the ladder's last rung, postcopy (the destination runs the
    /// guest before all its memory has arrived).
    #[arg(long)]
    pub allow_postcopy: bool,
    /// Never throttle the guest's vCPUs to make the migration converge.
    #[arg(long)]
    pub no_throttle: bool,
    /// Seconds without progress that count as a stall (default 10).
    #[arg(long)]
    pub stall_s: Option<u64>,
    /// Seconds without a byte sent that count as a dead link (cut cable,
    /// a destination that stopped reading): abort at once (default: three
    /// stall windows).
    #[arg(long)]
    pub link_timeout_s: Option<u64>,
    /// Send memory over N parallel streams (QEMU's multifd; helps where
    /// one stream is CPU-bound, e.g. TLS on a fast link). Not with
    /// --allow-postcopy (QEMU 10 cannot combine them).
    #[arg(long, value_name = "N")]
    pub multifd: Option<u8>,
    /// Cancel the VM's running migration; the VM stays on the source.
    #[arg(long, conflicts_with = "status")]
    pub cancel: bool,
    /// Show where the VM's latest migration from this host is (phase,
    /// rung, bytes, downtime, why it failed).
    #[arg(long)]
    pub status: bool,
    /// Copy every disk to the destination, even one it could share. By
    /// default a disk is copied only where the destination does not see
    /// the source's probe file beside it (storage not shared).
    #[arg(long)]
    pub copy_storage: bool,
}

pub async fn run(
    src: &Client,
    a: MigrateArgs,
    json: bool,
    identity_dir: &str,
) -> anyhow::Result<()> {
    if a.status {
        let r: MigrationReport = src.get(&format!("/v1/vms/{}/migration", a.name)).await?;
        if json {
            return print_json(&r);
        }
        print_report(&r);
        return Ok(());
    }
    if a.cancel {
        let r: MigrationReport = src
            .post(&format!("/v1/vms/{}/migration/cancel", a.name), &())
            .await?;
        if json {
            return print_json(&r);
        }
        println!("cancelling the migration of {}", a.name);
        return Ok(());
    }
    let (dst, listen) = match (&a.to, &a.to_socket) {
        (Some(to), _) => {
            let host = crate::remote::resolve(to.clone(), identity_dir).await?;
            let listen = match &a.listen {
                Some(l) => l.clone(),
                None => format!("{}:0", listen_host(&host.address)),
            };
            (crate::remote::connect_to(host, identity_dir)?, listen)
        }
        (None, Some(socket)) => (
            Client::new(socket),
            a.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into()),
        ),
        (None, None) => bail!("say where to: --to HOST or --to-socket PATH"),
    };
    let info: VmInfo = src
        .get(&format!("/v1/vms/{}", a.name))
        .await
        .with_context(|| format!("reading `{}` on the source", a.name))?;
    if info.state != VmState::Running {
        bail!("`{}` is {}: only a running VM migrates", a.name, info.state);
    }
    // A protected VM migrates with its protection: read how, and refuse
    // what cannot work before the destination is touched.
    let protection = match src
        .get::<MigrationProtection>(&format!("/v1/vms/{}/migration/protection", a.name))
        .await
    {
        Ok(p) => Some(p),
        Err(tandem_api::ApiError::Server { status: 404, .. }) => None,
        Err(e) => return Err(e).context("reading how the VM is protected on the source"),
    };
    if let Some(p) = &protection {
        check_protected_migration(&a, p)?;
    }
    let source: MigrationSource = src
        .post(
            &format!("/v1/vms/{}/migration/disks", a.name),
            &MigrationDisksRequest {
                copy_all: a.copy_storage,
            },
        )
        .await
        .with_context(|| format!("reading the disks of `{}` on the source", a.name))?;
    // The network follows the VM: its DHCP bindings and multicast groups
    // on the source's switch (none on a host without one, or a tandemd
    // from before the handover existed).
    let network = match src
        .get::<Vec<tandem_api::NicHandover>>(&format!("/v1/vms/{}/network", a.name))
        .await
    {
        Ok(n) => n,
        Err(tandem_api::ApiError::Server { status: 404, .. }) => Vec::new(),
        Err(e) => return Err(e).context("reading the VM's network state on the source"),
    };
    let ready: IncomingMigrationReply = dst
        .post(
            "/v1/migrations/incoming",
            &IncomingMigrationRequest {
                spec_toml: info.spec_toml.clone(),
                uuid: info.uuid.clone(),
                listen,
                allow_postcopy: a.allow_postcopy,
                accept_timeout_s: None,
                multifd_channels: a.multifd,
                disks: source.disks,
                source_tls_name: source.tls_name,
                protection: protection.as_ref().map(|p| p.request.clone()),
                network,
            },
        )
        .await
        .context("preparing the destination")?;
    if let (Some(c), Some(_)) = (&ready.copy_storage, &protection) {
        remove_destination(&dst, &a.name).await;
        bail!(
            "`{}` is protected (fault tolerance), and the destination does not share its storage (disk{} {} would be copied): QEMU cannot mirror a disk to the backup and to the destination at once; migrate it between hosts that share its storage, or unprotect it first",
            a.name,
            if c.disks.len() == 1 { "" } else { "s" },
            c.disks.join(", ")
        );
    }
    if let Some(c) = &ready.copy_storage {
        if !json {
            eprintln!(
                "copying disk{} {} to the destination (its storage is not shared with the source)",
                if c.disks.len() == 1 { "" } else { "s" },
                c.disks.join(", ")
            );
        }
    }
    let req = MigrateRequest {
        uri: ready.uri.clone(),
        tls_hostname: ready.tls_hostname.clone(),
        downtime_ms: a.downtime_ms,
        max_downtime_ms: a.max_downtime_ms,
        bandwidth_bps: a.bandwidth.map(|m| m.saturating_mul(1 << 20)),
        allow_postcopy: a.allow_postcopy,
        allow_throttle: Some(!a.no_throttle),
        stall_s: a.stall_s,
        link_timeout_s: a.link_timeout_s,
        multifd_channels: a.multifd,
        copy_storage: ready.copy_storage.clone(),
    };
    let started: Result<MigrationReport, _> =
        src.post(&format!("/v1/vms/{}/migrate", a.name), &req).await;
    if let Err(e) = started {
        remove_destination(&dst, &a.name).await;
        return Err(e).context("starting the migration on the source");
    }
    let report = follow(src, &a.name, json).await;
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            // The source is unreachable mid-migration: the destination
            // removes its VM by itself when the stream breaks.
            return Err(e);
        }
    };
    match report.phase {
        MigrationPhase::AwaitingConfirm => {}
        phase => {
            remove_destination(&dst, &a.name).await;
            if json {
                print_json(&report)?;
            }
            bail!(
                "the migration of `{}` {}: {}; the VM runs on at the source",
                a.name,
                match phase {
                    MigrationPhase::Cancelled => "was cancelled",
                    MigrationPhase::Aborted => "was aborted",
                    _ => "failed",
                },
                report.message.as_deref().unwrap_or("no reason given")
            );
        }
    }
    // QEMU finished: the source is paused. Copied disks are whole now
    // (the source ended its mirrors), which the destination waits to hear
    // before it runs the guest. The source goes only once the destination
    // is seen running it.
    let released = match &ready.copy_storage {
        Some(_) => dst
            .post::<(), ()>(&format!("/v1/vms/{}/migration/run", a.name), &())
            .await
            .map_err(|e| eprintln!("telling the destination to run the guest: {e:#}"))
            .is_ok(),
        None => true,
    };
    let running = released && wait_running(&dst, &a.name, Duration::from_secs(30)).await;
    // A protected VM: the destination protects it to the same backup, one
    // generation up, before the source lets go; the output the source held
    // goes out once the destination's first commit covers it.
    let mut committed = false;
    let mut first_commit_ms = None;
    let mut protect_failure = None;
    if let (true, Some(p)) = (running, &protection) {
        let t = Instant::now();
        match protect_destination(&dst, &a, p, &info.uuid, identity_dir, json).await {
            Ok(c) => {
                committed = c;
                first_commit_ms = c.then(|| t.elapsed().as_millis() as u64);
            }
            Err(e) => protect_failure = Some(e),
        }
    }
    let running = running && protect_failure.is_none();
    if !running {
        // Gone before the source resumes: the two never run at once.
        remove_destination(&dst, &a.name).await;
    }
    let mut confirmed: MigrationReport = src
        .post(
            &format!("/v1/vms/{}/migration/confirm", a.name),
            &MigrationConfirm {
                destination_running: running,
                destination_committed: committed,
            },
        )
        .await
        .context("confirming the migration on the source")?;
    if committed {
        // The source has just sent the output it held, from the guest's
        // MACs: the network now takes the source's port for them. Have the
        // destination announce the guest again (measured by the benchmark:
        // without this a quiet guest stayed unreachable).
        if let Err(e) = dst
            .post::<(), ()>(&format!("/v1/vms/{}/announce", a.name), &())
            .await
        {
            eprintln!(
                "warning: the destination did not announce `{}` again: {e:#}",
                a.name
            );
        }
    }
    if let Some(e) = protect_failure {
        return Err(e.context(format!(
            "protecting `{}` on the destination failed; the destination's copy was removed and the source resumed it, still protected",
            a.name
        )));
    }
    if !running {
        bail!(
            "the destination did not run `{}` after the stream completed; the source resumed it",
            a.name
        );
    }
    if protection.is_some() && !committed {
        eprintln!(
            "warning: `{}` runs on the destination, but its protection there has not committed to the backup within {} s: its output stays held until it does (tandem ft status {})",
            a.name,
            FIRST_COMMIT_BOUND.as_secs(),
            a.name
        );
    }
    confirmed.first_commit_ms = first_commit_ms;
    if json {
        return print_json(&confirmed);
    }
    println!(
        "migrated {} in {:.1} s: downtime {} ms, rung {}, {} sent",
        a.name,
        report.elapsed_ms as f64 / 1000.0,
        report
            .downtime_ms
            .map_or_else(|| "?".to_string(), |d| d.to_string()),
        report.rung,
        tandem_progress::human_bytes(report.transferred)
    );
    if let Some(ms) = first_commit_ms {
        println!("protected on the destination: first commit to the backup {ms} ms after the stream ended");
    }
    Ok(())
}

/// Refuses what a protected VM's migration cannot do, before anything is
/// touched.
fn check_protected_migration(a: &MigrateArgs, p: &MigrationProtection) -> anyhow::Result<()> {
    if let (Some(backup), Some(to)) = (&p.backup_host, &a.to) {
        if *backup == to.name {
            bail!(
                "`{}` is protected to {backup}: migrating it onto its own backup host would leave it with no backup on another host; migrate it to a third host (or protect it to another backup first)",
                a.name
            );
        }
    }
    if a.copy_storage {
        bail!(
            "`{}` is protected (fault tolerance): its disks cannot be copied to the destination (QEMU cannot mirror a disk to the backup and to the destination at once); migrate it between hosts that share its storage, or unprotect it first",
            a.name
        );
    }
    if p.record_generation.is_some() && a.to.is_none() {
        bail!(
            "`{}` is recorded with the cluster manager: migrate it with --to HOST, so that the record can name its new primary",
            a.name
        );
    }
    Ok(())
}

/// How long the destination's protection may take to commit its first
/// epoch (a running copy of the RAM that differs from the replica, then
/// one checkpoint) before the migration ends without it.
const FIRST_COMMIT_BOUND: Duration = Duration::from_secs(120);

/// Protects the migrated VM on the destination to the source's backup,
/// one generation up (a managed VM's record is handed over first, so the
/// backup admits the destination), and waits for its first commit.
/// `Ok(false)`: protection runs but has not committed within the bound.
async fn protect_destination(
    dst: &Client,
    a: &MigrateArgs,
    p: &MigrationProtection,
    uuid: &str,
    identity_dir: &str,
    json: bool,
) -> anyhow::Result<bool> {
    let generation = match (p.record_generation, &a.to) {
        (Some(expected), Some(to)) => {
            let manager = crate::cluster::ManagerOpts::with_identity(identity_dir).client()?;
            let req = tandem_manager::api::HandoverRequest {
                expected_generation: expected,
                primary: to.name.clone(),
                backup: p.backup_host.clone(),
            };
            let rec: tandem_manager::api::AuthorityRecord = manager
                .post(&format!("/v1/vms/{uuid}/handover"), &req)
                .await
                .context("handing the VM's authority record over to the destination")?;
            rec.generation
        }
        _ => p.generation + 1,
    };
    let req = tandem_api::ProtectRequest {
        generation: Some(generation),
        ..p.request.clone()
    };
    let _: serde_json::Value = dst
        .post(&format!("/v1/vms/{}/protect", a.name), &req)
        .await
        .with_context(|| {
            format!(
                "protecting `{}` on the destination (generation {generation}); the manager's record, if any, now names the destination: hand it back with `tandem cluster vm handover` if the VM stays on the source",
                a.name
            )
        })?;
    if !json {
        eprintln!(
            "protecting {} on the destination to {} (generation {generation}); waiting for its first commit",
            a.name, p.request.backup
        );
    }
    let deadline = Instant::now() + FIRST_COMMIT_BOUND;
    while Instant::now() < deadline {
        let st: Result<Vec<tandem_api::FtStatus>, _> = dst.get(&format!("/v1/ft/{}", a.name)).await;
        if let Ok(st) = st {
            if st.iter().any(|s| {
                s.role == Some(tandem_api::FtRole::Primary)
                    && s.state == tandem_api::FtState::Protected
            }) {
                return Ok(true);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(false)
}

/// How often the source's report is read while the stream runs.
const FOLLOW_POLL: Duration = Duration::from_millis(25);
/// How often progress is shown (a terminal line, a JSON event).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Polls the source's report, showing progress, until the migration
/// leaves `running`. Ctrl-C cancels it (the VM stays on the source).
async fn follow(src: &Client, name: &str, json: bool) -> anyhow::Result<MigrationReport> {
    let mut reporter = Reporter::new(Mode::auto(json));
    let mut tracker = Tracker::new();
    // Disks first (when copied), then memory: each phase its own bar, so
    // that neither goes backwards.
    let mut phase = "storage";
    let t0 = Instant::now();
    let mut cancelled = false;
    let mut failures = 0;
    // The end is seen within a poll (the source waits paused until the
    // CLI confirms: every poll interval is downtime for the client), but
    // progress is shown at most every PROGRESS_EVERY.
    let mut shown: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                cancelled = true;
                let _: Result<MigrationReport, _> = src
                    .post(&format!("/v1/vms/{name}/migration/cancel"), &())
                    .await;
            }
        }
        let r: MigrationReport = match src.get(&format!("/v1/vms/{name}/migration")).await {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                if failures >= 20 {
                    return Err(e).context("the source stopped answering mid-migration");
                }
                continue;
            }
        };
        failures = 0;
        if phase == "storage" && r.rung != "storage" {
            phase = "memory";
            tracker = Tracker::new();
        }
        tracker.observe(tandem_progress::Sample {
            done: r.transferred,
            remaining: r.remaining,
            at_ms: t0.elapsed().as_millis() as u64,
        });
        let state = match r.phase {
            MigrationPhase::Running => "running",
            MigrationPhase::AwaitingConfirm | MigrationPhase::Done => "done",
            MigrationPhase::Cancelled | MigrationPhase::Aborted => "cancelled",
            _ => "failed",
        };
        if state == "done" {
            tracker.finish();
        }
        let mut event: Event = tracker.event(&format!("migrate {name}"), phase);
        event.state = state.to_string();
        event.message = r.message.clone();
        event.extra.insert("rung".into(), serde_json::json!(r.rung));
        event
            .extra
            .insert("iteration".into(), serde_json::json!(r.iteration));
        event
            .extra
            .insert("dirty_rate_bps".into(), serde_json::json!(r.dirty_rate_bps));
        if let Some(d) = r.expected_downtime_ms {
            event
                .extra
                .insert("expected_downtime_ms".into(), serde_json::json!(d));
        }
        let done = r.phase != MigrationPhase::Running;
        if done || shown.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
            reporter.emit(&event);
            shown = Some(Instant::now());
        }
        if done {
            reporter.finish();
            return Ok(r);
        }
    }
}

fn print_report(r: &MigrationReport) {
    let phase = serde_json::to_value(r.phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    println!("{}: {phase}, rung {}", r.vm, r.rung);
    println!(
        "  {:.1} s, memory {} sent, {} remaining, dirty rate {}/s, iteration {}",
        r.elapsed_ms as f64 / 1000.0,
        tandem_progress::human_bytes(r.transferred),
        tandem_progress::human_bytes(r.remaining),
        tandem_progress::human_bytes(r.dirty_rate_bps),
        r.iteration
    );
    if r.storage_bytes > 0 {
        println!(
            "  disks copied: {} in {} ms",
            tandem_progress::human_bytes(r.storage_bytes),
            r.storage_ms.unwrap_or(0)
        );
    }
    if let Some(d) = r.downtime_ms {
        println!("  downtime {d} ms");
    }
    if let Some(m) = &r.message {
        println!("  {}", tandem_progress::sanitize(m));
    }
}

/// Whether the destination runs the VM within `bound`. A destination
/// that answers it does not have the VM (a restarted tandemd removed the
/// unfinished incoming VM) ends the wait at once; one that does not answer
/// is waited for (a tandemd restarting), up to the bound.
async fn wait_running(dst: &Client, name: &str, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        match dst.get::<VmInfo>(&format!("/v1/vms/{name}")).await {
            Ok(v) if v.state == VmState::Running => return true,
            Err(tandem_api::ApiError::Server { status: 404, .. }) => return false,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The host part of a `HOST:PORT` address (brackets kept for IPv6).
fn listen_host(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(h, _)| h)
}

/// Removes the destination's VM (it may already be gone).
async fn remove_destination(dst: &Client, name: &str) {
    let _: Result<serde_json::Value, _> = dst.delete(&format!("/v1/vms/{name}")).await;
}
