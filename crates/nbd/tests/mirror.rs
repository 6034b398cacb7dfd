//! The real use: QEMU's `blockdev-mirror` from a qcow2 disk to our export,
//! full sync first, then write-blocking, driven over QMP.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{describe, run, Served, MIB};
use serde_json::{json, Value};
use tandem_nbd::{DiskWrite, WriteLog};
use tandem_qmp::QmpClient;
use tokio::sync::broadcast;

const T: Duration = Duration::from_secs(20);

async fn wait_event(events: &mut broadcast::Receiver<tandem_qmp::QmpEvent>, name: &str) -> Value {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match events.recv().await {
                Ok(ev) if ev.name == name => return ev.data,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("event stream ended waiting for {name}: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event"))
}

/// Runs a qemu-io command inside QEMU on BlockBackend `node`, as a guest
/// write would. The
/// command returns once the I/O has completed. Its report goes to QEMU's
/// stdout, not the monitor, so success is judged by what reached the
/// export.
async fn hmp_qemu_io(qmp: &QmpClient, node: &str, cmd: &str) {
    let out = qmp
        .execute_raw(
            "human-monitor-command",
            json!({ "command-line": format!("qemu-io {node} \"{cmd}\"") }),
            T,
        )
        .await
        .unwrap();
    // Argument and lookup errors do come back through the monitor.
    let text = out.as_str().unwrap_or_default();
    assert!(text.is_empty(), "qemu-io {node} {cmd}: {text}");
}

/// (kind, offset, length, the byte a data write is uniformly filled with)
/// per write. Keeps assertion failures readable.
fn summary(log: &WriteLog) -> Vec<(&'static str, u64, u64, Option<u8>)> {
    log.writes()
        .iter()
        .map(|w| match w {
            DiskWrite::Data { offset, data } => {
                let fill = data.iter().all(|&b| b == data[0]).then_some(data[0]);
                ("data", *offset, w.len(), fill)
            }
            DiskWrite::Zero { offset, len } => ("zero", *offset, *len, None),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_blockdev_mirror_full_then_write_blocking() {
    let size = 16 * MIB;
    let srv = Served::new(size);
    let src = srv.dir.path().join("src.qcow2");
    let src_s = src.to_str().unwrap();
    let out = run("qemu-img", &["create", "-q", "-f", "qcow2", src_s, "16M"]).await;
    assert!(out.status.success(), "{}", describe(&out));
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            src_s,
            "-c",
            "write -P 0x61 0 1M",
            "-c",
            "write -P 0x62 5M 512k",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    // Stale bytes where the source is a hole: full sync must zero them.
    std::fs::write(&srv.backing, vec![0xee; size as usize]).unwrap();

    let qmp_path = srv.dir.path().join("qmp.sock");
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        // The source as a named BlockBackend, standing in for the guest's
        // disk: HMP qemu-io then writes through it as the guest would,
        // instead of through a temporary backend whose teardown drains the
        // node (which lets the mirror job copy the write in the background
        // and would hide whether the write-blocking path works).
        .arg("-drive")
        .arg(format!(
            "if=none,id=drv0,node-name=src,format=qcow2,file={src_s}"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-system-x86_64 must be installed");
    let qmp = QmpClient::connect_retry(&qmp_path, T).await.unwrap();
    let mut events = qmp.events();

    qmp.execute_raw(
        "blockdev-add",
        json!({
            "driver": "nbd",
            "node-name": "tgt",
            "server": { "type": "unix", "path": srv.sock.to_str().unwrap() },
            "export": "disk",
        }),
        T,
    )
    .await
    .unwrap();
    qmp.execute_raw(
        "blockdev-mirror",
        json!({
            "job-id": "m0",
            "device": "src",
            "target": "tgt",
            "sync": "full",
            "filter-node-name": "mtop",
        }),
        T,
    )
    .await
    .unwrap();
    let ready = wait_event(&mut events, "BLOCK_JOB_READY").await;
    assert_eq!(ready["device"], "m0");

    // After READY the target holds the whole source.
    let mut want = vec![0u8; size as usize];
    want[..MIB as usize].fill(0x61);
    want[5 * MIB as usize..(5 * MIB + 512 * 1024) as usize].fill(0x62);
    assert!(
        srv.backing_bytes() == want,
        "target differs after full sync"
    );
    let bulk = srv.export.take_writes().unwrap();
    assert!(bulk.bytes() >= MIB + 512 * 1024, "{} bytes", bulk.bytes());
    // Replaying the bulk log over the same stale start reproduces it.
    let replica_path = srv.dir.path().join("replica.raw");
    std::fs::write(&replica_path, vec![0xee; size as usize]).unwrap();
    let replica = std::fs::OpenOptions::new()
        .write(true)
        .open(&replica_path)
        .unwrap();
    bulk.apply_to(&replica).unwrap();
    assert!(std::fs::read(&replica_path).unwrap() == want);

    // Switch to write-blocking: from here every write reaches us before
    // it completes.
    qmp.execute_raw(
        "block-job-change",
        json!({ "id": "m0", "type": "mirror", "copy-mode": "write-blocking" }),
        T,
    )
    .await
    .unwrap();
    // Throttle the job's own copying to a crawl, so a write can reach the
    // target in time only through the write-blocking path; in background
    // mode it would sit in the dirty bitmap and the checks below would fail.
    qmp.execute_raw(
        "block-job-set-speed",
        json!({ "device": "m0", "speed": 1 }),
        T,
    )
    .await
    .unwrap();
    let jobs = qmp
        .execute_raw("query-block-jobs", json!({}), T)
        .await
        .unwrap();
    assert_eq!(jobs[0]["device"], "m0", "{jobs}");

    for round in 0..3u64 {
        let off = 8 * MIB + round * 64 * 1024;
        let cmd = format!("write -P 0x{:x} {off} 64k", 0x63 + round);
        hmp_qemu_io(&qmp, "drv0", &cmd).await;
        // The write completed in QEMU, so it must already be logged.
        let log = srv.export.take_writes().unwrap();
        assert_eq!(
            summary(&log),
            vec![("data", off, 65536, Some(0x63 + round as u8))],
            "round {round}: the completed write was not mirrored synchronously"
        );
        log.apply_to(&replica).unwrap();
        want[off as usize..(off + 65536) as usize].fill(0x63 + round as u8);
    }
    hmp_qemu_io(&qmp, "drv0", "write -z 9M 128k").await;
    let log = srv.export.take_writes().unwrap();
    assert_eq!(summary(&log), vec![("zero", 9 * MIB, 128 * 1024, None)]);
    log.apply_to(&replica).unwrap();

    assert!(srv.backing_bytes() == want, "target diverged");
    assert!(
        std::fs::read(&replica_path).unwrap() == want,
        "replica diverged"
    );

    // Cancelling a READY mirror leaves the target consistent and detaches.
    qmp.execute_raw("block-job-cancel", json!({ "device": "m0" }), T)
        .await
        .unwrap();
    wait_event(&mut events, "BLOCK_JOB_COMPLETED").await;
    let _ = qmp.execute_raw("quit", json!({}), T).await;
    let status = tokio::time::timeout(T, qemu.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(srv.export.stats().protocol_errors, 0);
    srv.handle.stop().await.unwrap();
}
