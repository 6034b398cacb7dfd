//! The server against QEMU's own NBD client, through qemu-io and qemu-img.

mod common;

use common::{describe, qemu_io, run, RawClient, Served, MIB};
use tandem_nbd::proto::{self, Command};
use tandem_nbd::DiskWrite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_read_flush_is_logged() {
    let srv = Served::new(4 * MIB);
    let out = qemu_io(
        &srv.uri(),
        &[
            "write -P 0xab 4096 65536",
            "read -P 0xab 4096 65536",
            "flush",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");

    let log = srv.export.take_writes().unwrap();
    assert_eq!(
        log.writes(),
        &[DiskWrite::Data {
            offset: 4096,
            data: vec![0xab; 65536],
        }]
    );
    assert_eq!(log.bytes(), 65536);
    assert!(srv.export.take_writes().unwrap().is_empty());

    let b = srv.backing_bytes();
    assert_eq!(b.len() as u64, 4 * MIB);
    assert!(b[..4096].iter().all(|&x| x == 0));
    assert!(b[4096..4096 + 65536].iter().all(|&x| x == 0xab));
    assert!(b[4096 + 65536..].iter().all(|&x| x == 0));

    let st = srv.export.stats();
    assert!(st.writes >= 1 && st.reads >= 1 && st.flushes >= 1, "{st:?}");
    assert_eq!(st.bytes_written, 65536);
    srv.handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_zero_and_discard_are_logged_as_zero_writes() {
    let srv = Served::new(4 * MIB);
    let out = qemu_io(
        &srv.uri(),
        &[
            "write -P 0x11 0 1M",
            "write -z 0 64k",
            "discard 1M 64k",
            "read -P 0 0 64k",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let log = srv.export.take_writes().unwrap();
    assert_eq!(
        log.len(),
        3,
        "{:?}",
        log.writes()
            .iter()
            .map(|w| (w.offset(), w.len()))
            .collect::<Vec<_>>()
    );
    assert!(matches!(log.writes()[0], DiskWrite::Data { offset: 0, .. }));
    assert_eq!(
        log.writes()[1],
        DiskWrite::Zero {
            offset: 0,
            len: 65536
        }
    );
    assert_eq!(
        log.writes()[2],
        DiskWrite::Zero {
            offset: MIB,
            len: 65536
        }
    );

    // A replica built from the log matches the primary's target.
    let replica = tempfile::tempfile().unwrap();
    replica.set_len(4 * MIB).unwrap();
    log.apply_to(&replica).unwrap();
    let mut got = Vec::new();
    use std::io::{Read, Seek};
    let mut r = &replica;
    r.rewind().unwrap();
    r.read_to_end(&mut got).unwrap();
    assert_eq!(got, srv.backing_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_copies_a_file() {
    let srv = Served::new(8 * MIB);
    let src = srv.dir.path().join("src.raw");
    // Data with holes in between, so qemu-img exercises both writes and
    // (if it chooses) zero writes.
    let mut img = vec![0u8; 8 * MIB as usize];
    for (i, chunk) in img.chunks_mut(MIB as usize).enumerate() {
        if i % 3 != 1 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i * 31 + j * 7) as u8;
            }
        }
    }
    std::fs::write(&src, &img).unwrap();
    // Dirty the target first, so holes in the source must be written as
    // zeroes for the copy to come out equal.
    std::fs::write(&srv.backing, vec![0xee; 8 * MIB as usize]).unwrap();

    let out = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &srv.uri(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(srv.backing_bytes() == img, "target differs from source");

    // Replaying the log over the same dirty start gives the same image.
    let replica_path = srv.dir.path().join("replica.raw");
    std::fs::write(&replica_path, vec![0xee; 8 * MIB as usize]).unwrap();
    let replica = std::fs::OpenOptions::new()
        .write(true)
        .open(&replica_path)
        .unwrap();
    let log = srv.export.take_writes().unwrap();
    assert!(log.extent_bytes() >= 8 * MIB);
    let wire = log.coalesced().encode();
    tandem_nbd::WriteLog::decode(&wire)
        .unwrap()
        .apply_to(&replica)
        .unwrap();
    assert!(std::fs::read(&replica_path).unwrap() == img);

    // qemu-img compare agrees, via QEMU's own reader.
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &srv.uri(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_write_fails_cleanly_and_server_keeps_serving() {
    let srv = Served::new(MIB);

    // QEMU checks past-the-end I/O against the size we reported and fails
    // it before sending anything (qemu-io exits 1, "Input/output error").
    let out = qemu_io(&srv.uri(), &["write -P 0x1 1020k 8k"]).await;
    assert!(!out.status.success(), "{}", describe(&out));

    // So send the out-of-range requests raw: the server must answer with
    // an error and keep the connection.
    let (mut c, size, _) = RawClient::connect_go(&srv.sock, "disk").await;
    assert_eq!(size, MIB);
    assert_eq!(c.write(MIB - 4096, &[7u8; 8192]).await, proto::ENOSPC);
    assert_eq!(c.write(u64::MAX - 10, &[7u8; 100]).await, proto::ENOSPC);
    assert_eq!(c.read(MIB, 1).await, Err(proto::EINVAL));
    let cookie = c.send_request(Command::Trim, MIB - 1, 2, &[]).await;
    assert_eq!(c.read_reply(0).await, (proto::EINVAL, cookie, vec![]));
    // Same connection still works.
    assert_eq!(c.write(0, b"still here").await, 0);
    assert_eq!(c.read(0, 10).await.unwrap(), b"still here");
    drop(c);

    // And QEMU can still use the export.
    let out = qemu_io(&srv.uri(), &["write -P 0x5 0 4k", "read -P 0x5 0 4k"]).await;
    assert!(out.status.success(), "{}", describe(&out));
    let log = srv.export.take_writes().unwrap();
    assert_eq!(log.len(), 2, "only the in-range writes are logged");
    assert!(srv.export.stats().error_replies >= 4);
}
