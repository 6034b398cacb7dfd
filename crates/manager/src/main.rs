//! `tandem-manager`: the cluster manager daemon.
//!
//! Runs on a state directory made by `tandem cluster init`. Serves the
//! manager API over mutual TLS on `--listen`; state lives in the store
//! file, so a restart picks up where it left off. SIGTERM or SIGINT stop
//! it gracefully.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tandem_manager::clock::SystemClock;
use tandem_manager::server::{serve, ManagerTls};
use tandem_manager::state::{manager_identity, StateDir, DEFAULT_STATE_DIR};
use tandem_manager::store::{RedbStore, Store};
use tandem_manager::{Manager, Settings};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "tandem-manager",
    version,
    about = "tandem cluster manager: host inventory, certificates and VM authority over mutual TLS"
)]
struct Args {
    /// The state directory made by `tandem cluster init`.
    #[arg(long, env = "TANDEM_MANAGER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    /// Address to serve on, HOST:PORT (default: cluster.json's `listen`,
    /// set by `cluster init --listen`).
    #[arg(long, env = "TANDEM_MANAGER_LISTEN")]
    listen: Option<String>,

    /// Lifetime of host certificates; hosts renew at 2/3 of it.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    host_cert_validity: Duration,

    /// Default lifetime of a join token.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_ttl: Duration,

    /// A host not heard from for this long shows as stale.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    host_stale_after: Duration,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandem-manager: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        error!("{e:#}");
        eprintln!("tandem-manager: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.host_cert_validity < Duration::from_secs(60) {
        bail!("--host-cert-validity must be at least 1 minute");
    }
    let dir = StateDir::new(&args.state_dir);
    let config = dir.config()?;
    let ca = dir
        .load_ca()
        .with_context(|| format!("loading the cluster CA from {}", dir.ca_dir().display()))?;
    if ca.cluster_id() != config.cluster_id {
        bail!(
            "{}: the CA is cluster {}, cluster.json says {}",
            dir.root().display(),
            ca.cluster_id(),
            config.cluster_id
        );
    }
    let (identity, _) = manager_identity(&dir, &ca, &config.manager_name)?;
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.db_path())?);
    let settings = Settings {
        host_cert_validity: args.host_cert_validity,
        token_ttl: args.token_ttl,
        stale_after: args.host_stale_after,
        ..Settings::default()
    };
    let manager = Manager::open(
        store,
        ca,
        &config.manager_name,
        Arc::new(SystemClock),
        settings,
    )
    .await?;
    manager.set_manager_cert_not_after(identity.not_after());
    // The same certificate dials hosts' APIs (the distributed switch).
    manager.set_identity(&identity)?;
    // Deployments that were running when the last manager stopped go on.
    match manager.resume_deployments().await {
        Ok(0) => {}
        Ok(n) => info!(n, "resumed running deployments"),
        Err(e) => tracing::warn!("deployments not resumed: {e}"),
    }
    let tls = Arc::new(ManagerTls::new(identity, manager.revocation_list())?);
    let listen = args.listen.unwrap_or(config.listen.clone());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or(listen),
        cluster = %config.cluster_name,
        cluster_id = %config.cluster_id,
        manager = %config.manager_name,
        store = %manager.store().describe(),
        "tandem-manager ready"
    );

    let housekeeping = tokio::spawn(housekeeping(
        Arc::clone(&manager),
        Arc::clone(&tls),
        dir.clone(),
        config.manager_name.clone(),
    ));
    serve(listener, manager, tls, shutdown_signal()).await?;
    housekeeping.abort();
    info!("tandem-manager stopped");
    Ok(())
}

/// Every minute: expired tokens and old revocations go; the manager's own
/// certificate is renewed in its last third.
async fn housekeeping(manager: Arc<Manager>, tls: Arc<ManagerTls>, dir: StateDir, name: String) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = manager.sweep().await {
            warn!("housekeeping: {e}");
        }
        match manager_identity(&dir, manager.ca(), &name) {
            Ok((id, true)) => {
                manager.set_manager_cert_not_after(id.not_after());
                if let Err(e) = manager.set_identity(&id) {
                    warn!("dialling hosts with the renewed manager certificate: {e}");
                }
                if let Err(e) = tls.replace(id) {
                    warn!("switching to the renewed manager certificate: {e}");
                }
            }
            Ok((_, false)) => {}
            Err(e) => warn!("renewing the manager's certificate: {e}"),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}
