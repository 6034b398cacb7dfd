//! What the CLI's end-to-end tests share: a manager served in the test's
//! process over TLS on 127.0.0.1, and the real `tandem` binary run bounded.

#![allow(dead_code)] // each test binary uses its own part

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tandem_manager::clock::SystemClock;
use tandem_manager::server::{serve, ManagerTls};
use tandem_manager::state::{manager_identity, StateDir};
use tandem_manager::store::{RedbStore, Store};
use tandem_manager::{Manager, Settings};
use tokio::sync::oneshot;

pub const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
pub const BOUND: Duration = Duration::from_secs(30);

pub struct Served {
    pub addr: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

pub async fn start(state: &Path) -> Served {
    let dir = StateDir::new(state);
    let config = dir.config().unwrap();
    let ca = dir.load_ca().unwrap();
    let (identity, _) = manager_identity(&dir, &ca, &config.manager_name).unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.db_path()).unwrap());
    let m = Manager::open(
        store,
        ca,
        &config.manager_name,
        Arc::new(SystemClock),
        Settings::default(),
    )
    .await
    .unwrap();
    m.set_identity(&identity).unwrap();
    let tls = Arc::new(ManagerTls::new(identity, m.revocation_list()).unwrap());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(l, m, tls, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Served { addr, stop, task }
}

pub async fn stop(s: Served) {
    let _ = s.stop.send(());
    tokio::time::timeout(BOUND, s.task)
        .await
        .expect("manager stops")
        .unwrap();
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", self.stdout, self.stderr))
    }
}

/// Runs `tandem ARGS`, bounded. The future owns its arguments.
pub fn tandem<S: AsRef<str>>(args: &[S]) -> impl std::future::Future<Output = Out> + 'static {
    let args: Vec<String> = args.iter().map(|s| s.as_ref().to_string()).collect();
    async move {
        let run = tokio::task::spawn_blocking(move || {
            Command::new(TANDEM)
                .args(&args)
                .env_remove("TANDEM_MANAGER")
                .env_remove("TANDEM_IDENTITY")
                .env_remove("TANDEM_JOIN_TOKEN")
                .output()
                .unwrap()
        });
        let o = tokio::time::timeout(BOUND, run)
            .await
            .expect("tandem finishes")
            .unwrap();
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}
