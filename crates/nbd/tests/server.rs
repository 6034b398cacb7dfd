//! Server behaviour QEMU's tools cannot provoke: broken clients, option
//! haggling corners, concurrency, shutdown, and the epoch cut.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{describe, qemu_io, RawClient, Served, MIB};
use tandem_nbd::proto::{self, ClientFlags, Command};
use tandem_nbd::{serve_tcp, DiskWrite, Export, NbdError, WriteLog};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() {
    let srv = Served::new(MIB);
    let (mut good, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    assert_eq!(good.write(0, b"before").await, 0);

    // Garbage instead of client flags.
    let mut bad = RawClient::connect(&srv.sock).await;
    bad.s.write_all(&[0xff; 64]).await.unwrap();
    assert!(bad.closed_by_server().await);

    // Garbage instead of an option header.
    let mut bad = RawClient::connect(&srv.sock).await;
    let mut g = [0u8; proto::GREETING_LEN];
    bad.s.read_exact(&mut g).await.unwrap();
    bad.s
        .write_all(&ClientFlags::default().encode())
        .await
        .unwrap();
    bad.s.write_all(b"this is not an NBD option").await.unwrap();
    assert!(bad.closed_by_server().await);

    // Garbage instead of a request, after a proper GO.
    let (mut bad, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    bad.s.write_all(&[0x42; 28]).await.unwrap();
    assert!(bad.closed_by_server().await);

    // An option claiming a huge payload is cut off, not buffered.
    let mut bad = RawClient::connect(&srv.sock).await;
    bad.s.read_exact(&mut g).await.unwrap();
    bad.s
        .write_all(&ClientFlags::default().encode())
        .await
        .unwrap();
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(b"IHAVEOPT");
    h[8..12].copy_from_slice(&proto::OPT_GO.to_be_bytes());
    h[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    bad.s.write_all(&h).await.unwrap();
    assert!(bad.closed_by_server().await);

    // The well-behaved connection never noticed.
    assert_eq!(good.write(6, b" after").await, 0);
    assert_eq!(good.read(0, 12).await.unwrap(), b"before after");
    wait_until("bad connections to end", || {
        srv.export.stats().connections_active == 1
    })
    .await;
    assert_eq!(srv.export.stats().protocol_errors, 4);
    assert_eq!(srv.export.take_writes().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_dying_mid_write_ends_only_its_connection() {
    let srv = Served::new(MIB);
    let (mut good, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    let (mut dying, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    // Header for 64 KiB, then only half of the payload, then gone.
    dying
        .send_request(Command::Write, 0, 65536, &[9u8; 32768])
        .await;
    drop(dying);
    wait_until("the dying connection to end", || {
        srv.export.stats().connections_active == 1
    })
    .await;
    assert!(
        srv.export.take_writes().unwrap().is_empty(),
        "a torn write was logged"
    );
    assert!(srv.backing_bytes()[..65536].iter().all(|&b| b == 0));
    assert_eq!(good.write(0, b"ok").await, 0);
    assert_eq!(srv.export.take_writes().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_write_payload_is_discarded_and_connection_survives() {
    let srv = Served::new(64 * MIB);
    let (mut c, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    let len = proto::MAX_PAYLOAD + 1;
    let payload = vec![0x77u8; len as usize];
    assert_eq!(c.write(0, &payload).await, proto::EINVAL);
    assert_eq!(c.read(0, len).await, Err(proto::EINVAL));
    assert_eq!(c.write(0, b"fine").await, 0);
    assert_eq!(c.read(0, 4).await.unwrap(), b"fine");
    assert_eq!(srv.export.take_writes().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_haggling_over_the_socket() {
    let srv = Served::new(3 * MIB);
    let mut c = RawClient::connect(&srv.sock).await;
    let mut g = [0u8; proto::GREETING_LEN];
    c.s.read_exact(&mut g).await.unwrap();
    // An old-style client: no NO_ZEROES, so EXPORT_NAME pads with zeroes.
    c.s.write_all(
        &ClientFlags {
            fixed_newstyle: true,
            no_zeroes: false,
        }
        .encode(),
    )
    .await
    .unwrap();

    c.send_option(proto::OPT_LIST, &[]).await;
    let (rep, data) = c.read_option_reply(proto::OPT_LIST).await;
    assert_eq!(rep, proto::REP_SERVER);
    assert_eq!(&data[4..], b"disk");
    assert_eq!(c.read_option_reply(proto::OPT_LIST).await.0, proto::REP_ACK);

    for opt in [
        proto::OPT_STRUCTURED_REPLY,
        proto::OPT_EXTENDED_HEADERS,
        proto::OPT_LIST_META_CONTEXT,
        proto::OPT_SET_META_CONTEXT,
        proto::OPT_STARTTLS,
        12345,
    ] {
        c.send_option(opt, b"whatever").await;
        assert_eq!(c.read_option_reply(opt).await.0, proto::REP_ERR_UNSUP);
    }

    let info = proto::InfoRequest {
        name: b"nope".to_vec(),
        requests: vec![],
    };
    c.send_option(proto::OPT_INFO, &info.encode()).await;
    assert_eq!(
        c.read_option_reply(proto::OPT_INFO).await.0,
        proto::REP_ERR_UNKNOWN
    );

    c.send_option(proto::OPT_EXPORT_NAME, b"disk").await;
    let mut reply = [0u8; 134];
    c.s.read_exact(&mut reply).await.unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 3 * MIB);
    let flags = u16::from_be_bytes(reply[8..10].try_into().unwrap());
    assert_eq!(flags, proto::TRANSMISSION_FLAGS);
    assert!(reply[10..].iter().all(|&b| b == 0));
    assert_eq!(c.write(0, b"x").await, 0);

    // NBD_CMD_DISC: the server closes after finishing what is in flight.
    c.send_request(Command::Disc, 0, 0, &[]).await;
    assert!(c.closed_by_server().await);

    // NBD_OPT_ABORT is acknowledged, then the connection ends.
    let mut c = RawClient::connect(&srv.sock).await;
    c.s.read_exact(&mut g).await.unwrap();
    c.s.write_all(&ClientFlags::default().encode())
        .await
        .unwrap();
    c.send_option(proto::OPT_ABORT, &[]).await;
    assert_eq!(
        c.read_option_reply(proto::OPT_ABORT).await.0,
        proto::REP_ACK
    );
    assert!(c.closed_by_server().await);
    assert_eq!(srv.export.stats().protocol_errors, 0);
}

/// Several connections pipeline overlapping writes while another task
/// takes the log again and again. Because each write reaches the file and
/// the log under one lock, replaying the logs in take order onto a blank
/// file must reproduce the backing file exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_takes_cut_cleanly() {
    let srv = Served::new(MIB);
    let export = srv.export.clone();
    let taker = tokio::spawn(async move {
        let mut logs = Vec::new();
        for _ in 0..50 {
            logs.push(export.take_writes().unwrap());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        logs
    });
    let mut clients = Vec::new();
    for id in 0..4u8 {
        let sock = srv.sock.clone();
        clients.push(tokio::spawn(async move {
            let (mut c, _, _) = RawClient::connect_go(&sock, "").await;
            let mut expect = Vec::new();
            for round in 0..25u64 {
                // 8 pipelined requests, overlapping other clients' ranges.
                for k in 0..8u64 {
                    let off = ((round * 8 + k) * 4096 * 3 + u64::from(id) * 1000) % (MIB - 8192);
                    let len = 512 * (1 + ((round + k) % 8)) as u32;
                    let fill = vec![id.wrapping_mul(40).wrapping_add(k as u8); len as usize];
                    if k == 5 {
                        expect.push(c.send_request(Command::WriteZeroes, off, len, &[]).await);
                    } else {
                        expect.push(c.send_request(Command::Write, off, len, &fill).await);
                    }
                }
                for _ in 0..8 {
                    let (err, cookie, _) = c.read_reply(0).await;
                    assert_eq!(err, 0);
                    assert!(expect.contains(&cookie));
                }
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let mut logs = taker.await.unwrap();
    logs.push(srv.export.take_writes().unwrap());
    let total: usize = logs.iter().map(WriteLog::len).sum();
    assert_eq!(total, 4 * 25 * 8);
    assert!(logs.iter().filter(|l| !l.is_empty()).count() > 1);

    let replica = tempfile::tempfile().unwrap();
    replica.set_len(MIB).unwrap();
    let mut all = WriteLog::new();
    for l in logs {
        all.extend(l);
    }
    // Through the wire format and the coalescer too.
    WriteLog::decode(&all.coalesced().encode())
        .unwrap()
        .apply_to(&replica)
        .unwrap();
    let mut got = vec![0u8; MIB as usize];
    replica.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == srv.backing_bytes(),
        "replica diverged from the primary"
    );
    assert_eq!(srv.export.stats().zero_writes, 4 * 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_and_flush_succeed() {
    let srv = Served::new(MIB);
    let (mut c, _, flags) = RawClient::connect_go(&srv.sock, "disk").await;
    assert_ne!(flags & proto::FLAG_SEND_FUA, 0);
    let r = proto::Request {
        flags: proto::CMD_FLAG_FUA,
        command: Command::Write,
        cookie: 99,
        offset: 512,
        length: 3,
    };
    c.s.write_all(&r.encode()).await.unwrap();
    c.s.write_all(b"fua").await.unwrap();
    assert_eq!(c.read_reply(0).await, (0, 99, vec![]));
    let cookie = c.send_request(Command::Flush, 0, 0, &[]).await;
    assert_eq!(c.read_reply(0).await, (0, cookie, vec![]));
    // CACHE is a harmless no-op, BLOCK_STATUS was never negotiated.
    let cookie = c.send_request(Command::Cache, 0, 4096, &[]).await;
    assert_eq!(c.read_reply(0).await, (0, cookie, vec![]));
    let cookie = c.send_request(Command::BlockStatus, 0, 4096, &[]).await;
    assert_eq!(c.read_reply(0).await, (proto::EINVAL, cookie, vec![]));
    assert_eq!(&srv.backing_bytes()[512..515], b"fua");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_clients_and_removes_socket() {
    let srv = Served::new(MIB);
    let (mut c, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    assert_eq!(c.write(0, b"x").await, 0);
    let sock = srv.sock.clone();
    tokio::time::timeout(Duration::from_secs(10), srv.handle.stop())
        .await
        .expect("stop hung")
        .unwrap();
    assert!(c.closed_by_server().await);
    assert!(!sock.exists());
    // The export outlives its server: the log is still there to take.
    assert_eq!(srv.export.take_writes().unwrap().len(), 1);
    assert_eq!(srv.export.stats().connections_active, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_and_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let export = Export::new(dir.path().join("b.raw"), MIB).unwrap();
    let sock = dir.path().join("s");
    let first = tandem_nbd::serve_unix(export.clone(), &sock).unwrap();
    // Simulate a crashed predecessor: the socket file stays behind.
    std::mem::forget(first);
    let second = tandem_nbd::serve_unix(export.clone(), &sock).unwrap();
    let (mut c, _, _) = RawClient::connect_go(&sock, "disk").await;
    assert_eq!(c.write(0, b"y").await, 0);
    second.stop().await.unwrap();

    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"keep me").unwrap();
    assert!(matches!(
        tandem_nbd::serve_unix(export, &plain),
        Err(NbdError::Config(_))
    ));
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
}

#[test]
fn export_backing_file_rules() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.raw");
    {
        let e = Export::new(&p, 10 * MIB).unwrap();
        assert_eq!(e.size(), 10 * MIB);
        assert_eq!(e.name(), "disk");
    }
    let meta = std::fs::metadata(&p).unwrap();
    assert_eq!(meta.len(), 10 * MIB);
    // Created sparse.
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < MIB, "backing file is not sparse");

    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(b"data", 100)
        .unwrap();
    // Reopening the same size keeps the contents.
    let e = Export::with_name("vda", &p, 10 * MIB).unwrap();
    assert_eq!(e.name(), "vda");
    drop(e);
    assert_eq!(&std::fs::read(&p).unwrap()[100..104], b"data");
    // A different size is refused rather than truncating a disk.
    assert!(matches!(
        Export::new(&p, 5 * MIB),
        Err(NbdError::SizeMismatch { .. })
    ));
    assert!(matches!(
        Export::new(dir.path().join("x"), u64::MAX),
        Err(NbdError::TooLarge(_))
    ));
    assert!(matches!(
        Export::new(dir.path(), MIB),
        Err(NbdError::Io { .. } | NbdError::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_with_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let export = Export::new(dir.path().join("b.raw"), 2 * MIB).unwrap();
    let handle = serve_tcp(export.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = handle.local_addr().unwrap();
    let uri = format!("nbd://{}:{}/disk", addr.ip(), addr.port());
    let out = qemu_io(&uri, &["write -P 0x3c 1M 8k", "read -P 0x3c 1M 8k"]).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        export.take_writes().unwrap().writes(),
        &[DiskWrite::Data {
            offset: MIB,
            data: vec![0x3c; 8192]
        }]
    );
    handle.stop().await.unwrap();
}

/// `serve_stream` runs a connection over any byte stream.
#[tokio::test]
async fn serve_stream_over_a_duplex_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let export: Arc<Export> = Export::new(dir.path().join("b.raw"), MIB).unwrap();
    let (client, server) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(tandem_nbd::serve_stream(export.clone(), server));
    let (mut r, mut w) = tokio::io::split(client);
    let mut g = [0u8; proto::GREETING_LEN];
    r.read_exact(&mut g).await.unwrap();
    w.write_all(&ClientFlags::default().encode()).await.unwrap();
    let h = proto::OptionHeader {
        option: proto::OPT_EXPORT_NAME,
        len: 0,
    };
    w.write_all(&h.encode()).await.unwrap();
    let mut reply = [0u8; 134];
    r.read_exact(&mut reply).await.unwrap();
    let req = proto::Request {
        flags: 0,
        command: Command::WriteZeroes,
        cookie: 5,
        offset: 0,
        length: 4096,
    };
    w.write_all(&req.encode()).await.unwrap();
    let mut rep = [0u8; proto::SIMPLE_REPLY_LEN];
    r.read_exact(&mut rep).await.unwrap();
    assert_eq!(
        proto::SimpleReply::parse(&rep).unwrap(),
        proto::SimpleReply {
            error: 0,
            cookie: 5
        }
    );
    drop(w);
    drop(r);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        export.take_writes().unwrap().writes(),
        &[DiskWrite::Zero {
            offset: 0,
            len: 4096
        }]
    );
}

/// M14: a log nobody takes stops growing at its cap; the take then says
/// the disk must be resent whole, and the backing file has every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_log_is_capped_and_overflow_means_resend_the_disk() {
    let srv = Served::new(8 * MIB);
    let cap = 256 * 1024;
    srv.export.set_log_cap(cap);
    assert_eq!(srv.export.log_cap(), cap);
    let (mut c, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    // 2 MiB of writes, eight times the cap, all acknowledged.
    for i in 0..32u64 {
        assert_eq!(c.write(i * 65536, &[i as u8 + 1; 65536]).await, 0);
        let (n, bytes) = srv.export.pending();
        assert!(bytes <= cap, "write {i}: {n} writes, {bytes} bytes held");
    }
    let o = srv.export.overflow().expect("overflowed");
    assert_eq!(o.cap, cap);
    assert_eq!(o.dropped_writes, 32);
    assert_eq!(o.dropped_bytes, 32 * 65536);
    assert_eq!(srv.export.take_writes(), Err(o));
    // Nothing was lost on the target, which is what gets resent.
    let disk = srv.backing_bytes();
    for i in 0..32usize {
        assert!(disk[i * 65536..(i + 1) * 65536]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
    // The next epoch logs normally again.
    assert_eq!(c.write(0, b"again").await, 0);
    let log = srv.export.take_writes().unwrap();
    assert_eq!(log.len(), 1);
    // Lowering the cap below what is held overflows at once.
    assert_eq!(c.write(0, &[7; 4096]).await, 0);
    srv.export.set_log_cap(100);
    assert_eq!(srv.export.pending(), (0, 0));
    assert!(srv.export.take_writes().is_err());
}

/// The owner's watch on its client: quiet while the client behaves, and
/// failed for good from its first refused write, its disconnection, or a
/// second client, without asking the client anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expected_client_is_watched() {
    let srv = Served::new(MIB);
    let t = srv.export.expect_client();
    assert_eq!(
        srv.export.client_check(t),
        Err(tandem_nbd::ClientFault::NotConnected)
    );
    let (mut c, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    // Attached before the client saw the GO reply.
    assert_eq!(srv.export.client_check(t), Ok(()));
    assert_eq!(c.write(0, b"fine").await, 0);
    assert_eq!(c.read(0, 4).await.unwrap(), b"fine");
    // A refused read loses no write.
    assert_eq!(c.read(2 * MIB, 4).await, Err(proto::EINVAL));
    assert_eq!(srv.export.client_check(t), Ok(()));
    // A write past the end is refused (ENOSPC): the client's job sees it
    // fail, so the log cannot vouch for the client's writes any more.
    assert_eq!(c.write(MIB - 2, b"over").await, proto::ENOSPC);
    let f = srv.export.client_check(t).unwrap_err();
    assert!(matches!(f, tandem_nbd::ClientFault::Refused { .. }), "{f}");
    assert!(f.to_string().contains("ENOSPC"), "{f}");
    // It stays failed even though the client goes on fine.
    assert_eq!(c.write(0, b"ok").await, 0);
    assert_eq!(srv.export.client_check(t), Err(f));

    // A fresh watch: the next connection is the client; its going away
    // fails the watch once every request it sent has been served.
    let t2 = srv.export.expect_client();
    assert_eq!(
        srv.export.client_check(t),
        Err(tandem_nbd::ClientFault::Superseded)
    );
    let (mut c2, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    assert_eq!(srv.export.client_check(t2), Ok(()));
    // The old connection is not the one watched now.
    drop(c);
    wait_until("the old connection to end", || {
        srv.export.stats().connections_active == 1
    })
    .await;
    assert_eq!(srv.export.client_check(t2), Ok(()));
    assert_eq!(c2.write(8, b"x").await, 0);
    drop(c2);
    wait_until("the watch to fail", || srv.export.client_check(t2).is_err()).await;
    let f = srv.export.client_check(t2).unwrap_err();
    assert!(
        matches!(f, tandem_nbd::ClientFault::Disconnected { .. }),
        "{f}"
    );

    // A second client attaching while one is watched.
    let t3 = srv.export.expect_client();
    let (_c3, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    assert_eq!(srv.export.client_check(t3), Ok(()));
    let (_c4, _, _) = RawClient::connect_go(&srv.sock, "disk").await;
    assert!(matches!(
        srv.export.client_check(t3),
        Err(tandem_nbd::ClientFault::SecondClient { .. })
    ));
}
