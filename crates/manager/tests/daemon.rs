//! The `tandem-manager` binary: clear startup errors, readiness, SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tandem_manager::api::ClusterStatus;
use tandem_manager::client::{ManagerClient, ManagerEndpoint};
use tandem_manager::state::{init, InitOptions, StateDir};
use tandem_pki::{Identity, NoRevocations};

const BIN: &str = env!("CARGO_BIN_EXE_tandem-manager");
const BOUND: Duration = Duration::from_secs(20);

/// Runs `f` on a thread and waits for it at most [`BOUND`].
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(BOUND)
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

#[test]
fn a_missing_state_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing");
    let out = bounded("tandem-manager", move || {
        Command::new(BIN)
            .arg("--state-dir")
            .arg(&missing)
            .output()
            .unwrap()
    });
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tandem cluster init"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_second_manager_on_the_same_state_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("m"));
    init(&state, &InitOptions::default()).unwrap();
    // Hold the database as a running manager would.
    let _held = tandem_manager::store::RedbStore::open(&state.db_path()).unwrap();
    let root = state.root().to_path_buf();
    let out = bounded("tandem-manager", move || {
        Command::new(BIN)
            .arg("--state-dir")
            .arg(&root)
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .unwrap()
    });
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
}

#[test]
fn it_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("m"));
    init(&state, &InitOptions::default()).unwrap();
    let mut child = Command::new(BIN)
        .arg("--state-dir")
        .arg(state.root())
        .args(["--listen", "127.0.0.1:0"])
        .env("TANDEM_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // The ready line names the bound address.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(BOUND)
            .expect("tandem-manager did not say it was ready");
        if line.contains("tandem-manager ready") {
            let at = line.find("listen=").expect("listen= in the ready line") + 7;
            break line[at..].split_whitespace().next().unwrap().to_string();
        }
    };
    let operator = Identity::load(&state.operator_dir()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status: ClusterStatus = rt
        .block_on(
            ManagerClient::new(
                ManagerEndpoint {
                    address: addr,
                    name: "manager".into(),
                    cluster_id: String::new(),
                },
                &operator,
                Arc::new(NoRevocations),
            )
            .unwrap()
            .with_timeout(BOUND)
            .get("/v1/cluster"),
        )
        .unwrap();
    assert_eq!(status.cluster_name, "tandem");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let code = bounded("tandem-manager's exit", move || child.wait().unwrap());
    assert_eq!(code.code(), Some(0));
    // The child has exited: its stderr ends, and the reader thread with it.
    let mut rest = Vec::new();
    while let Ok(line) = rx.recv_timeout(BOUND) {
        rest.push(line);
    }
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}
