//! The QMP client against scripted fake peers and against a real QEMU.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_qmp::{qmp, QmpClient, QmpError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#;

fn sock(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("qmp.sock")
}

/// Runs `script` for the first connection to a fresh socket.
fn fake_peer<F, Fut>(path: &Path, script: F)
where
    F: FnOnce(UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        if let Ok((s, _)) = listener.accept().await {
            script(s).await;
        }
    });
}

async fn read_cmd(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    serde_json::from_str(&line).unwrap()
}

/// A peer that greets and accepts qmp_capabilities, then hands over.
async fn negotiated(
    s: UnixStream,
) -> (
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
) {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(format!("{GREETING}\n").as_bytes())
        .await
        .unwrap();
    let cmd = read_cmd(&mut r).await;
    assert_eq!(cmd["execute"], "qmp_capabilities");
    w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", cmd["id"]).as_bytes())
        .await
        .unwrap();
    (r, w)
}

#[tokio::test]
async fn garbage_greeting_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    fake_peer(&sock(&dir), |mut s| async move {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let t = Instant::now();
    let e = QmpClient::connect(sock(&dir), Duration::from_secs(3))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, QmpError::Protocol(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn json_that_is_not_a_greeting_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    fake_peer(&sock(&dir), |mut s| async move {
        s.write_all(b"[1,2,3]\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let e = QmpClient::connect(sock(&dir), Duration::from_secs(3))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, QmpError::Protocol(_)), "{e:?}");
}

#[tokio::test]
async fn silent_peer_times_out_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    fake_peer(&sock(&dir), |s| async move {
        let _held_open = s;
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let t = Instant::now();
    let e = QmpClient::connect(sock(&dir), Duration::from_millis(300))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn close_mid_reply_fails_the_caller_and_later_calls() {
    let dir = tempfile::tempdir().unwrap();
    fake_peer(&sock(&dir), |s| async move {
        let (mut r, mut w) = negotiated(s).await;
        let _ = read_cmd(&mut r).await;
        w.write_all(br#"{"return": {"running": tr"#).await.unwrap();
        // Dropping both halves closes the socket mid-line.
    });
    let c = QmpClient::connect(sock(&dir), Duration::from_secs(3))
        .await
        .unwrap();
    let t = Instant::now();
    let e = c.execute(qmp::query_status {}).await.err().unwrap();
    assert!(matches!(e, QmpError::Closed), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
    tokio::time::timeout(Duration::from_secs(1), c.closed())
        .await
        .expect("closed() resolves");
    assert!(c.is_closed());
    assert!(matches!(
        c.execute(qmp::stop {}).await,
        Err(QmpError::Closed)
    ));
}

#[tokio::test]
async fn garbage_after_negotiation_fails_pending_calls() {
    let dir = tempfile::tempdir().unwrap();
    fake_peer(&sock(&dir), |s| async move {
        let (mut r, mut w) = negotiated(s).await;
        let _ = read_cmd(&mut r).await;
        w.write_all(b"\xff\xfe not json at all\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let c = QmpClient::connect(sock(&dir), Duration::from_secs(3))
        .await
        .unwrap();
    let e = c.execute(qmp::stop {}).await.err().unwrap();
    assert!(matches!(e, QmpError::Protocol(_)), "{e:?}");
}

#[tokio::test]
async fn concurrent_commands_get_their_own_replies_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    fake_peer(&sock(&dir), |s| async move {
        let (mut r, mut w) = negotiated(s).await;
        let a = read_cmd(&mut r).await;
        let b = read_cmd(&mut r).await;
        // Answer the second first; each reply names its command.
        for cmd in [&b, &a] {
            let reply = json!({"return": {"name": cmd["execute"]}, "id": cmd["id"]});
            w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let c = QmpClient::connect(sock(&dir), Duration::from_secs(3))
        .await
        .unwrap();
    let t = Duration::from_secs(3);
    let (ra, rb) = tokio::join!(
        c.execute_raw("query-name", json!({}), t),
        c.execute_raw("query-uuid", json!({}), t)
    );
    assert_eq!(ra.unwrap()["name"], "query-name");
    assert_eq!(rb.unwrap()["name"], "query-uuid");
}

#[tokio::test]
async fn qemu_error_maps_to_its_class_and_events_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    fake_peer(&sock(&dir), |s| async move {
        let (mut r, mut w) = negotiated(s).await;
        let cmd = read_cmd(&mut r).await;
        let ev = r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 5, "microseconds": 7}}"#;
        w.write_all(format!("{ev}\n").as_bytes()).await.unwrap();
        let reply = json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": cmd["id"]});
        w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let c = QmpClient::connect(sock(&dir), Duration::from_secs(3))
        .await
        .unwrap();
    let mut events = c.events();
    let e = c
        .execute_raw("no-such", json!({}), Duration::from_secs(3))
        .await
        .err()
        .unwrap();
    match e {
        QmpError::Qemu { class, desc } => {
            assert_eq!(class, "CommandNotFound");
            assert_eq!(desc, "nope");
        }
        other => panic!("{other:?}"),
    }
    let ev = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.name, "STOP");
    assert_eq!(ev.timestamp, Some((5, 7)));
    assert!(matches!(ev.typed(), Some(qmp::Event::STOP { .. })));
}

#[tokio::test]
async fn oversized_line_is_refused_not_buffered() {
    let dir = tempfile::tempdir().unwrap();
    fake_peer(&sock(&dir), |s| async move {
        let (mut r, mut w) = negotiated(s).await;
        let _ = read_cmd(&mut r).await;
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(tandem_qmp::MAX_LINE >> 20) + 2 {
            if w.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let c = QmpClient::connect(sock(&dir), Duration::from_secs(3))
        .await
        .unwrap();
    let e = c
        .execute_raw("query-status", json!({}), Duration::from_secs(20))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(e, QmpError::Protocol(_) | QmpError::Closed),
        "{e:?}"
    );
}

#[tokio::test]
async fn connect_retry_waits_for_the_socket_and_gives_up_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let e = QmpClient::connect_retry(sock(&dir), Duration::from_millis(300))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2));

    let path = sock(&dir);
    let p2 = path.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fake_peer(&p2, |s| async move {
            let _ = negotiated(s).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
    });
    QmpClient::connect_retry(&path, Duration::from_secs(5))
        .await
        .unwrap();
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn real_qemu_status_version_events_and_quit() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir);
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (run ci/setup-host.sh)");
    let mut qemu = KillOnDrop(child);

    let c = QmpClient::connect_retry(&path, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        c.version()["qemu"]["major"].as_u64().map(|m| m >= 7),
        Some(true)
    );
    let status = c.execute(qmp::query_status {}).await.unwrap();
    assert!(!status.running);
    let v = c.execute(qmp::query_version {}).await.unwrap();
    assert!(v.qemu.major >= 7);
    // A QEMU error comes back typed.
    let e = c
        .execute_raw("no-such-command", json!({}), Duration::from_secs(5))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&e, QmpError::Qemu { class, .. } if class == "CommandNotFound"),
        "{e:?}"
    );

    let mut events = c.events();
    c.execute(qmp::quit {}).await.unwrap();
    let shutdown = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Ok(ev) if ev.name == "SHUTDOWN" => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    tokio::time::timeout(Duration::from_secs(10), c.closed())
        .await
        .expect("closed after quit");
    assert!(shutdown, "no SHUTDOWN event before the connection closed");
    assert!(matches!(
        c.execute(qmp::query_status {}).await,
        Err(QmpError::Closed)
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while qemu.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        qemu.0.try_wait().unwrap().is_some(),
        "QEMU still running after quit"
    );
}
