//! tandemd: the tandem host daemon.
//!
//! It supervises the host's VMs and serves the HTTP/JSON API on a unix
//! socket. VMs outlive the daemon: stopping or restarting tandemd never stops
//! a VM, and a new tandemd re-attaches to them.
//!
//! `tandemd shim …` is the per-VM shim mode (see `tandem_supervisor::shim`).

mod api;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tandem_supervisor::shim::{run_shim, ShimLauncher};
use tandem_supervisor::{Supervisor, SupervisorConfig};
use tokio::net::UnixListener;
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

    /// The API socket.
    #[arg(long, env = "TANDEM_SOCKET", default_value = tandem_api::DEFAULT_SOCKET)]
    socket: PathBuf,

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
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let qemu = resolve_binary(&args.qemu);
    let cfg = SupervisorConfig {
        state_dir: args.state_dir.clone(),
        ram_dir: args.ram_dir.clone(),
        qemu_binary: qemu,
        qboot_rom: args.qboot_rom.clone(),
        shim: ShimLauncher {
            program: std::env::current_exe().context("locating the tandemd executable")?,
        },
        image_dir: args.image_dir.clone(),
        probe_timeout: Duration::from_millis(args.accel_probe_timeout_ms),
        start_timeout: Duration::from_millis(args.start_timeout_ms),
    };
    let listener = bind_socket(&args.socket).await?;
    let sup = Supervisor::open(cfg).await.context("loading VM records")?;
    info!(socket = %args.socket.display(), state_dir = %args.state_dir.display(), "tandemd ready");

    let app = api::router(Arc::clone(&sup));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the API")?;
    let _ = std::fs::remove_file(&args.socket);
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

/// Binds the API socket, refusing to steal it from a live tandemd.
async fn bind_socket(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!("another tandemd is already serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
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
