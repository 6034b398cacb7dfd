//! `tandem vm …`: define, start, inspect, pause, stop and destroy VMs;
//! checkpoints; the serial console.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use tandem_api::{ConsoleChunk, CreateVmRequest, StopRequest, VmInfo, VmSummary};

use crate::print_json;

#[derive(Subcommand, Debug)]
pub enum VmCmd {
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
    /// or paused VM into a new directory on the daemon's host, under its
    /// checkpoint root (tandemd --checkpoint-root, default
    /// STATE_DIR/checkpoints). A relative DIR is taken from that root.
    Checkpoint { name: String, dir: PathBuf },
    /// Start a stopped VM from a checkpoint directory (under the daemon's
    /// checkpoint root; a relative DIR is taken from there) instead of
    /// booting.
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

pub async fn run(client: &tandem_api::Client, cmd: VmCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        VmCmd::Create { spec, start } => create(client, &spec, start, json).await,
        VmCmd::Start { name } => {
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
            Ok(())
        }
        VmCmd::List => list(client, json).await,
        VmCmd::Info { name } => {
            let vm: VmInfo = client.get(&format!("/v1/vms/{name}")).await?;
            if json {
                return print_json(&vm);
            }
            print_info(&vm);
            Ok(())
        }
        VmCmd::Pause { name } => pause_or_resume(client, &name, "pause", json).await,
        VmCmd::Resume { name } => pause_or_resume(client, &name, "resume", json).await,
        VmCmd::Stop {
            name,
            timeout,
            force,
        } => stop(client, &name, timeout, force, json).await,
        VmCmd::Destroy { name } => {
            let v: serde_json::Value = client.delete(&format!("/v1/vms/{name}")).await?;
            if json {
                return print_json(&v);
            }
            println!("VM {name} destroyed");
            Ok(())
        }
        VmCmd::Checkpoint { name, dir } => checkpoint(client, &name, dir, json).await,
        VmCmd::Restore { name, dir } => restore(client, &name, dir, json).await,
        VmCmd::Console {
            name,
            follow,
            until,
            timeout,
        } => {
            follow_console(
                client,
                &name,
                follow || until.is_some(),
                until.as_deref(),
                timeout.map(Duration::from_secs),
            )
            .await
        }
    }
}

async fn create(
    client: &tandem_api::Client,
    spec: &std::path::Path,
    start: bool,
    json: bool,
) -> anyhow::Result<()> {
    let text = if spec.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(spec).with_context(|| format!("reading {}", spec.display()))?
    };
    let mut vm: VmInfo = client
        .post(
            "/v1/vms",
            &CreateVmRequest {
                spec_toml: text,
                uuid: None,
            },
        )
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
    Ok(())
}

async fn list(client: &tandem_api::Client, json: bool) -> anyhow::Result<()> {
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
    Ok(())
}

/// `vm pause` and `vm resume`: `action` is the API verb.
async fn pause_or_resume(
    client: &tandem_api::Client,
    name: &str,
    action: &str,
    json: bool,
) -> anyhow::Result<()> {
    let vm: VmInfo = client
        .post(&format!("/v1/vms/{name}/{action}"), &())
        .await?;
    if json {
        return print_json(&vm);
    }
    println!("VM {} {}", vm.name, vm.state);
    Ok(())
}

async fn stop(
    client: &tandem_api::Client,
    name: &str,
    timeout: Option<u64>,
    force: bool,
    json: bool,
) -> anyhow::Result<()> {
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
    Ok(())
}

async fn checkpoint(
    client: &tandem_api::Client,
    name: &str,
    dir: PathBuf,
    json: bool,
) -> anyhow::Result<()> {
    // Sent as given: the daemon resolves a relative path under its
    // checkpoint root, not under this shell's directory.
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
    Ok(())
}

async fn restore(
    client: &tandem_api::Client,
    name: &str,
    dir: PathBuf,
    json: bool,
) -> anyhow::Result<()> {
    // Sent as given: the daemon resolves a relative path under its
    // checkpoint root, not under this shell's directory.
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
    Ok(())
}

fn print_info(vm: &VmInfo) {
    println!("name:        {}", vm.name);
    println!(
        "uuid:        {}",
        if vm.uuid.is_empty() { "-" } else { &vm.uuid }
    );
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
