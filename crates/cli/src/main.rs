//! `tandem`: the command-line tool for tandemd.
//!
//! Human-readable output by default; `--json` prints the API's JSON for
//! scripts. Exit status is non-zero on any error: 1 in general, 2 for
//! usage, and for the cluster commands 3 not found, 4 refused, 5
//! conflict, 6 manager unreachable, 7 a distributed switch change not
//! completed, 8 invalid (see [`cluster`]).
//!
//! One module per noun ([`vm`], [`host`], [`ft`], [`switch`], [`cluster`]
//! and [`dvs`] for the manager's commands); this file holds the top level, the
//! dispatch and the output helpers. `tandem drill` and `tandem bench` are
//! external commands: [`external`] runs `tandem-lab` for them, so this
//! binary links only the API types and the manager's client.

mod cluster;
mod deploy;
mod dvs;
mod external;
mod ft;
mod host;
mod migrate;
mod remote;
mod switch;
mod vm;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde::Serialize;

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
    /// Talk to another host's tandemd over its host API (mutual TLS with
    /// the operator identity) instead of the local socket: NAME@HOST:PORT,
    /// or NAME alone to ask the manager where its API is.
    #[arg(long, global = true, env = "TANDEM_REMOTE")]
    remote: Option<remote::RemoteArg>,
    /// The identity `--remote` presents (an operator's).
    #[arg(long = "remote-identity", global = true, env = "TANDEM_REMOTE_IDENTITY", default_value_t = format!("{}/operator", tandem_manager::state::DEFAULT_STATE_DIR))]
    remote_identity: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Manage VMs.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// This host (tandemd), and the cluster's hosts (through the manager).
    #[command(subcommand)]
    Host(host::HostCmd),
    /// Protect a running VM: replicate it in epochs to a backup host.
    Protect(ft::ProtectArgs),
    /// End protection of a VM (the backup is told; it will not take over).
    Unprotect { name: String },
    /// Live-migrate a running VM to another tandemd, with progress and the
    /// convergence ladder; `--cancel` stops a running migration.
    Migrate(migrate::MigrateArgs),
    /// On the backup: run the VM here from its last committed epoch now.
    Failover { name: String },
    /// Fault tolerance.
    #[command(subcommand)]
    Ft(ft::FtCmd),
    /// The host's virtual switch.
    #[command(subcommand)]
    Switch(switch::SwitchCmd),
    /// The cluster: init, status, backup, restore, VM authority.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// The distributed switch across the cluster's hosts (through the
    /// manager): show, apply, history, rollback.
    #[command(subcommand)]
    Dvs(dvs::DvsCmd),
    /// Join tokens for new hosts.
    #[command(subcommand)]
    Token(cluster::TokenCmd),
    /// Copies of one template onto many hosts, each host with a copy
    /// becoming a source for the others (through the manager); shows the
    /// plan first, `--dry-run` only that.
    Deploy(deploy::DeployArgs),
    /// Benchmarks (timing lives here, not in tests). Runs `tandem-lab
    /// bench`: see `tandem bench --help`.
    #[command(disable_help_flag = true)]
    Bench(external::ExternalArgs),
    /// The failover drill on this machine: two hosts in network namespaces,
    /// a protected guest under a durable client workload, a random kill,
    /// and the invariants checked. Needs root. Exits non-zero on a
    /// violation. Runs `tandem-lab drill`: see `tandem drill --help`.
    #[command(disable_help_flag = true)]
    Drill(external::ExternalArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        // Never returns on success: the process becomes tandem-lab.
        Cmd::Bench(args) => external::run("bench", args, cli.json),
        Cmd::Drill(args) => external::run("drill", args, cli.json),
        cmd => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(async {
                let client = match cli.remote {
                    Some(host) => remote::client(host, &cli.remote_identity).await?,
                    None => tandem_api::Client::new(&cli.socket),
                };
                run(cmd, client, cli.json, &cli.remote_identity).await
            }),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(cluster::exit_code(&e));
    }
}

async fn run(
    cmd: Cmd,
    client: tandem_api::Client,
    json: bool,
    identity: &str,
) -> anyhow::Result<()> {
    match cmd {
        Cmd::Vm(c) => vm::run(&client, c, json).await,
        Cmd::Host(c) => host::run(&client, c, json).await,
        Cmd::Protect(a) => ft::protect(&client, a, json).await,
        Cmd::Unprotect { name } => ft::unprotect(&client, &name, json).await,
        Cmd::Migrate(a) => migrate::run(&client, a, json, identity).await,
        Cmd::Failover { name } => ft::failover(&client, &name, json).await,
        Cmd::Ft(c) => ft::run(&client, c, json).await,
        Cmd::Switch(c) => switch::run(&client, c, json).await,
        Cmd::Cluster(c) => cluster::run_cluster(c, json).await,
        Cmd::Token(c) => cluster::run_token(c, json).await,
        Cmd::Dvs(c) => dvs::run(c, json).await,
        Cmd::Deploy(a) => deploy::run(a, json).await,
        Cmd::Bench(_) | Cmd::Drill(_) => {
            anyhow::bail!("external commands run outside the async runtime")
        }
    }
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
