//! tandemd: the tandem host daemon.
//!
//! It supervises the host's VMs and serves the HTTP/JSON API on a unix
//! socket. VMs outlive the daemon: stopping or restarting tandemd never stops
//! a VM, and a new tandemd re-attaches to them.
//!
//! `tandemd shim …` is the per-VM shim mode (see `tandem_supervisor::shim`).

mod api;
mod apisock;
mod cluster;
mod deploy;
mod error;
mod faults;
mod ft;
mod ftdisk;
mod hostapi;
mod output;
mod switch;
mod switchtxn;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tandem_supervisor::shim::{run_shim, ShimLauncher};
use tandem_supervisor::{Supervisor, SupervisorConfig};
use tandem_switch::host::SwitchHost;
use tracing::info;

#[derive(Parser, Debug)]
#[command(
    name = "tandemd",
    version,
    about = "tandem host daemon: runs and supervises QEMU VMs"
)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,

    /// Where VM records, logs and sockets live.
    #[arg(long, env = "TANDEM_STATE_DIR", default_value = "/var/lib/tandem")]
    state_dir: PathBuf,

    /// The API socket (read-write): root's alone (0600), or also the
    /// `--api-group`'s (0660). Its directory, if tandemd creates it, is
    /// 0700 (0750).
    #[arg(long, env = "TANDEM_SOCKET", default_value = tandem_api::DEFAULT_SOCKET)]
    socket: PathBuf,

    /// A group (name or gid) whose members may use the read-write API
    /// socket besides root. Anyone else is refused (403), whatever the
    /// socket's mode. Default: root only.
    #[arg(long, env = "TANDEM_API_GROUP")]
    api_group: Option<String>,

    /// Also serve a read-only API socket here (0666): reads of status
    /// (GET) for any local user who can reach it; no changes, no console.
    #[arg(long, env = "TANDEM_API_RO_SOCKET")]
    api_ro_socket: Option<PathBuf>,

    /// Checkpoints asked for over the API (`vm checkpoint`, `vm restore`)
    /// are written and read only under this directory (default:
    /// STATE_DIR/checkpoints, created 0700).
    #[arg(long, env = "TANDEM_CHECKPOINT_ROOT")]
    checkpoint_root: Option<PathBuf>,

    /// Directory for guest RAM files; must be a shared-memory file system.
    #[arg(long, default_value = "/dev/shm")]
    ram_dir: PathBuf,

    #[arg(long, env = "TANDEM_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,

    #[arg(long, default_value = "/usr/share/qemu/qboot.rom")]
    qboot_rom: PathBuf,

    /// Guest image directory (used by the KVM probe boot).
    #[arg(
        long,
        env = "TANDEM_IMAGE_DIR",
        default_value = "/var/lib/tandem/images"
    )]
    image_dir: PathBuf,

    /// Bound on the KVM probe boot that `accelerator = "auto"` runs once per host.
    #[arg(long, default_value_t = 20_000)]
    accel_probe_timeout_ms: u64,

    /// Bound on QEMU answering QMP after it is started.
    #[arg(long, default_value_t = 15_000)]
    start_timeout_ms: u64,

    /// Where VM switch NICs' vhost-user sockets live (default: STATE_DIR/switch).
    #[arg(long)]
    switch_dir: Option<PathBuf>,

    /// The switch configuration document (default: STATE_DIR/switch.toml);
    /// `tandem switch apply` replaces it.
    #[arg(long)]
    switch_config: Option<PathBuf>,

    /// Accept replication streams (be a backup) on HOST:PORT or unix:PATH.
    #[arg(long)]
    repl_listen: Option<String>,

    /// Heartbeat interval on replication links, both ways.
    #[arg(long, default_value_t = 100)]
    ft_heartbeat_ms: u64,

    /// Primary: pause the guest after this long without word from the backup.
    #[arg(long, default_value_t = 1500)]
    ft_fence_timeout_ms: u64,

    /// Backup: take over after this long without word from the primary.
    /// At least the fencing timeout plus the shim lease's grace, its poll
    /// and two heartbeats (tandemd names the minimum if it is less).
    #[arg(long, default_value_t = 2500)]
    ft_takeover_timeout_ms: u64,

    /// Primary: when the backup stays reachable but commits nothing for
    /// this long (its disk is full, its applies fail), have it disarm,
    /// release the VM's held output and run unprotected while protection
    /// is retried. 0 holds the output until the backup commits or
    /// protection is ended by hand.
    #[arg(long, default_value_t = 10_000)]
    ft_degrade_after_ms: u64,

    /// This host's cluster identity (`identity.pem`, from `tandem host
    /// join` or `tandem cluster init --standalone`); default STATE/identity.
    /// With one, TCP replication links are mutual TLS both ways.
    #[arg(long)]
    identity_dir: Option<PathBuf>,

    /// Serve the host API on the management network at HOST:PORT, over
    /// mutual TLS for the cluster's manager and operators (needs an
    /// identity). `0.0.0.0:PORT` follows the host port's address through
    /// switch changes.
    #[arg(long, env = "TANDEM_HOST_API")]
    host_api: Option<std::net::SocketAddr>,

    /// The address the manager reaches the host API at, when `--host-api`
    /// listens on a wildcard (default: `--host-api` itself).
    #[arg(long, env = "TANDEM_HOST_API_ADVERTISE")]
    host_api_advertise: Option<String>,

    /// Where deployments copy images into and serve them from (default:
    /// `--image-dir`).
    #[arg(long, env = "TANDEM_DATASTORE")]
    datastore: Option<PathBuf>,

    /// Serve the datastore to the cluster's hosts for fan-out
    /// deployment on this TCP address (mutual TLS with the cluster's
    /// certificates; needs an identity).
    #[arg(long, env = "TANDEM_IMAGE_LISTEN")]
    image_listen: Option<std::net::SocketAddr>,

    /// The address other hosts reach the image service at, when
    /// `--image-listen` is a wildcard (default: `--image-listen` itself).
    #[arg(long, env = "TANDEM_IMAGE_ADVERTISE")]
    image_advertise: Option<String>,

    /// Accept replication streams on TCP from peers that present no
    /// certificate: only for a lab, or a link you trust as much as this
    /// host. Without it, a TCP `--repl-listen` needs a cluster identity.
    #[arg(long)]
    repl_unauthenticated: bool,

    /// Standalone pair: who may protect which VMs to this host (a TOML
    /// list of certificate names and VM UUIDs); needs an identity.
    #[arg(long)]
    repl_peers: Option<PathBuf>,

    /// Backup: never take over on its own; only `tandem failover` does.
    #[arg(long)]
    no_auto_failover: bool,

    /// Primary: dirty-page tracker when `protect` names none: `auto`
    /// (uffd where QEMU's preload registers guest RAM, else soft-dirty
    /// where the kernel has it, else scan), `scan`, `soft-dirty` or `uffd`.
    #[arg(long, default_value = "auto")]
    ft_tracker: tandem_replication::tracker::TrackerChoice,

    /// Primary: cap on a protected disk's write log between two epochs, in
    /// MiB (the disk's size if smaller). Past it the log is dropped and the
    /// whole disk is sent again, instead of memory growing without bound.
    #[arg(long, env = "TANDEM_FT_DISK_LOG_CAP_MIB", default_value_t = tandem_nbd::DEFAULT_LOG_CAP >> 20)]
    ft_disk_log_cap_mib: u64,

    /// Test only (fault-injection builds): `new` pre-associates every VM
    /// as a new one, never as migrated (the negative control of the
    /// network following a migrated VM); `no-handover` drops what the
    /// source handed over, so the switch must ask DHCP.
    #[arg(long, hide = true)]
    fault_association: Option<faults::AssociationFault>,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Internal: parent one QEMU process and record its exit (started by tandemd).
    #[command(hide = true)]
    Shim {
        #[arg(long)]
        run_dir: PathBuf,
        #[arg(long)]
        qemu: PathBuf,
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Mode::Shim {
        run_dir,
        qemu,
        args,
    }) = &args.mode
    {
        std::process::exit(run_shim(run_dir, qemu, args));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: logs kept in files (the
        // drill's, the tests') stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    if let Some(f) = args.fault_association {
        faults::set_association(f)?;
    }
    let qemu = resolve_binary(&args.qemu);
    let switch_dir = args
        .switch_dir
        .clone()
        .unwrap_or_else(|| args.state_dir.join("switch"));
    let switch_config = args
        .switch_config
        .clone()
        .unwrap_or_else(|| args.state_dir.join("switch.toml"));
    // A switch transaction left pending by a tandemd that died is rolled
    // back before the switch, or anything else, starts.
    let recovered = switchtxn::recover_at_start(&args.state_dir, &switch_config)
        .context("recovering a pending switch transaction")?;
    let switch = SwitchHost::start(&switch_config)
        .with_context(|| format!("starting the switch with {}", switch_config.display()))?;
    let cfg = SupervisorConfig {
        state_dir: args.state_dir.clone(),
        ram_dir: args.ram_dir.clone(),
        checkpoint_root: args
            .checkpoint_root
            .clone()
            .unwrap_or_else(|| args.state_dir.join("checkpoints")),
        qemu_binary: qemu,
        qboot_rom: args.qboot_rom.clone(),
        shim: ShimLauncher {
            program: std::env::current_exe().context("locating the tandemd executable")?,
        },
        image_dir: args.image_dir.clone(),
        probe_timeout: Duration::from_millis(args.accel_probe_timeout_ms),
        start_timeout: Duration::from_millis(args.start_timeout_ms),
        switch_dir,
        nic_ports: Some(Arc::new(switch::SwitchPorts(switch.clone()))),
        identity_dir: Some(args.identity_dir.clone().unwrap_or_else(|| {
            args.state_dir
                .join(tandem_manager::agent::HOST_IDENTITY_DIR)
        })),
    };
    let api_group = match &args.api_group {
        Some(g) => Some(apisock::ApiGroup {
            gid: tandem_supervisor::sock::group_id(g)
                .with_context(|| format!("--api-group {g}"))?,
            name: g.clone(),
        }),
        None => None,
    };
    let sockets = apisock::bind(&args.socket, api_group, args.api_ro_socket.as_deref()).await?;
    let sup = Supervisor::open(cfg).await.context("loading VM records")?;
    info!(socket = %args.socket.display(), state_dir = %args.state_dir.display(), "tandemd ready");

    let listen = match &args.repl_listen {
        Some(s) => Some(
            s.parse::<tandem_replication::link::Endpoint>()
                .map_err(|e| anyhow::anyhow!("--repl-listen: {e}"))?,
        ),
        None => None,
    };
    let min_takeover = tandem_replication::primary::min_takeover_timeout(
        Duration::from_millis(args.ft_fence_timeout_ms),
        Duration::from_millis(args.ft_heartbeat_ms),
    );
    if Duration::from_millis(args.ft_takeover_timeout_ms) < min_takeover {
        bail!(
            "--ft-takeover-timeout-ms ({}) must be at least {} ms: the fencing timeout ({} ms), \
             the shim lease's grace and poll ({} ms) and two heartbeats ({} ms); \
             otherwise a partition, or a primary whose tandemd died, could leave the VM running on both hosts",
            args.ft_takeover_timeout_ms,
            min_takeover.as_millis(),
            args.ft_fence_timeout_ms,
            (min_takeover.as_millis() as u64)
                .saturating_sub(args.ft_fence_timeout_ms + 2 * args.ft_heartbeat_ms),
            2 * args.ft_heartbeat_ms
        );
    }
    let identity_dir = args.identity_dir.clone().unwrap_or_else(|| {
        args.state_dir
            .join(tandem_manager::agent::HOST_IDENTITY_DIR)
    });
    let qemu_for_inventory = resolve_binary(&args.qemu);
    let host_api_advertise = args
        .host_api_advertise
        .clone()
        .or_else(|| args.host_api.map(|a| a.to_string()));
    let datastore = args
        .datastore
        .clone()
        .unwrap_or_else(|| args.image_dir.clone());
    let image_advertise = args
        .image_advertise
        .clone()
        .or_else(|| args.image_listen.map(|a| a.to_string()));
    let cluster = cluster::start(&identity_dir, args.repl_peers.as_deref(), |txns| {
        cluster::HostReporter {
            host_api: host_api_advertise,
            image_service: image_advertise,
            txns,
            state_dir: args.state_dir.clone(),
            image_dir: Some(args.image_dir.clone()),
            datastore: Some(datastore.clone()),
            qemu: cluster::HostReporter::probe_qemu(&qemu_for_inventory),
            switch: switch.clone(),
        }
    })?;
    let managed = cluster.as_ref().is_some_and(|c| c.mode == "manager");
    let txns = switchtxn::SwitchTxns::new(switch.clone(), &args.state_dir, managed, recovered);
    if let Some(c) = &cluster {
        c.attach_switch_txns(txns.clone());
    }
    let host_api = match (args.host_api, &cluster) {
        (None, _) => None,
        (Some(addr), None) => bail!(
            "--host-api {addr} needs a cluster identity in {} (tandem host join, or tandem cluster init --standalone): \
             the host API admits only the cluster's manager and operators",
            identity_dir.display()
        ),
        (Some(addr), Some(c)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--host-api: binding {addr}"))?;
            info!(%addr, "host API: mutual TLS, manager and operator certificates");
            Some((listener, c.clone()))
        }
    };
    let image_service = match (args.image_listen, &cluster) {
        (None, _) => None,
        (Some(addr), None) => bail!(
            "--image-listen {addr} needs a cluster identity in {} (tandem host join): \
             the image service admits only the cluster's hosts, manager and operators",
            identity_dir.display()
        ),
        (Some(addr), Some(c)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--image-listen: binding {addr}"))?;
            info!(%addr, dir = %datastore.display(), "image service: mutual TLS, the cluster's certificates");
            Some((listener, c.clone()))
        }
    };
    let deploy = deploy::Deploy::new(datastore.clone(), cluster.clone());
    if cluster.is_none() && matches!(listen, Some(tandem_replication::link::Endpoint::Tcp(_))) {
        if !args.repl_unauthenticated {
            bail!(
                "--repl-listen on TCP needs a cluster identity in {}, so that only certified hosts of the cluster \
                 can replicate here (tandem host join, or tandem cluster init --standalone); \
                 --repl-unauthenticated accepts anyone who can reach the port (a lab only)",
                identity_dir.display()
            );
        }
        tracing::warn!(
            "--repl-unauthenticated: the replication listener accepts any TCP peer; this host has no cluster identity"
        );
    }
    let ft = ft::Ft::start(
        sup.clone(),
        ft::FtSettings {
            listen,
            replica_root: args.state_dir.join("replicas"),
            heartbeat: Duration::from_millis(args.ft_heartbeat_ms),
            fence_timeout: Duration::from_millis(args.ft_fence_timeout_ms),
            takeover_timeout: Duration::from_millis(args.ft_takeover_timeout_ms),
            degrade_after: (args.ft_degrade_after_ms > 0)
                .then(|| Duration::from_millis(args.ft_degrade_after_ms)),
            auto_failover: !args.no_auto_failover,
            tracker: args.ft_tracker,
            disk_log_cap: args.ft_disk_log_cap_mib.saturating_mul(1 << 20),
            cluster,
        },
        Some(switch.clone()),
    )
    .await
    .context("starting the replication service")?;

    let app = api::router(Arc::clone(&sup))
        .merge(ft::router(ft))
        .merge(switch::router(switch.clone(), txns.clone()))
        .merge(switchtxn::router(txns))
        .merge(deploy::router(deploy));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let image_task = image_service.map(|(listener, c)| {
        let mut stop = stop_rx.clone();
        let dir = datastore.clone();
        tokio::spawn(deploy::serve_images(listener, c, dir, async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    });
    let host_api_task = host_api.map(|(listener, c)| {
        let mut stop = stop_rx.clone();
        tokio::spawn(hostapi::serve(listener, c, app.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    });
    apisock::serve(sockets, app, shutdown_signal()).await?;
    let _ = stop_tx.send(true);
    if let Some(t) = host_api_task {
        let _ = t.await;
    }
    if let Some(t) = image_task {
        let _ = t.await;
    }
    tokio::task::block_in_place(|| switch.shutdown());
    info!("tandemd stopped; VMs keep running and will be re-attached by the next tandemd");
    Ok(())
}

fn resolve_binary(p: &std::path::Path) -> PathBuf {
    if p.components().count() > 1 {
        return p.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(p))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| p.to_path_buf())
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
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
