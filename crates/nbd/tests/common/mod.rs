//! Shared fixtures: a served export in a temp dir, QEMU's tools run
//! asynchronously (the server lives in the same runtime), and a minimal
//! raw NBD client for what QEMU's tools will not send.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use tandem_nbd::proto::{self, ClientFlags, Command, InfoRequest, OptionHeader, Request};
use tandem_nbd::{serve_unix, Export, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub const MIB: u64 = 1024 * 1024;

pub struct Served {
    pub dir: tempfile::TempDir,
    pub export: Arc<Export>,
    pub handle: ServerHandle,
    pub sock: PathBuf,
    pub backing: PathBuf,
}

impl Served {
    pub fn new(size: u64) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.raw");
        let sock = dir.path().join("nbd.sock");
        let export = Export::new(&backing, size).unwrap();
        let handle = serve_unix(export.clone(), &sock).unwrap();
        Served {
            dir,
            export,
            handle,
            sock,
            backing,
        }
    }

    /// The URI syntax qemu-io/qemu-img accept for an NBD export on a unix
    /// socket: `nbd+unix:///EXPORT?socket=PATH`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.sock.display())
    }

    pub fn backing_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.backing).unwrap()
    }
}

/// Runs a program with a deadline, so a hung QEMU tool fails the test
/// rather than the whole run.
pub async fn run(program: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

pub fn describe(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `qemu-io -f raw URI -c ... -c ...`.
pub async fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    run("qemu-io", &args).await
}

/// A minimal NBD client speaking through the crate's own encoders.
pub struct RawClient {
    pub s: UnixStream,
    next_cookie: u64,
}

impl RawClient {
    pub async fn connect(sock: &Path) -> RawClient {
        RawClient {
            s: UnixStream::connect(sock).await.unwrap(),
            next_cookie: 1,
        }
    }

    /// Handshake plus NBD_OPT_GO; returns the size and flags reported.
    pub async fn connect_go(sock: &Path, name: &str) -> (RawClient, u64, u16) {
        let mut c = RawClient::connect(sock).await;
        let mut g = [0u8; proto::GREETING_LEN];
        c.s.read_exact(&mut g).await.unwrap();
        assert_eq!(g, proto::server_greeting());
        let flags = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        };
        c.s.write_all(&flags.encode()).await.unwrap();
        let data = InfoRequest {
            name: name.as_bytes().to_vec(),
            requests: vec![proto::INFO_BLOCK_SIZE],
        }
        .encode();
        c.send_option(proto::OPT_GO, &data).await;
        let (mut size, mut tflags) = (0, 0);
        loop {
            let (reply, data) = c.read_option_reply(proto::OPT_GO).await;
            match reply {
                proto::REP_INFO if data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    tflags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
                proto::REP_INFO => {}
                proto::REP_ACK => break,
                other => panic!("NBD_OPT_GO failed with {other:#x}"),
            }
        }
        (c, size, tflags)
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.s.write_all(&h.encode()).await.unwrap();
        self.s.write_all(data).await.unwrap();
    }

    pub async fn read_option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        let h = proto::OptionReplyHeader::parse(&h).unwrap();
        assert_eq!(h.option, option);
        let mut data = vec![0u8; h.len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (h.reply, data)
    }

    pub async fn send_request(
        &mut self,
        command: Command,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let r = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&r.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
        cookie
    }

    /// Reads one simple reply; `read_len` bytes of data follow a successful
    /// READ reply.
    pub async fn read_reply(&mut self, read_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        let r = proto::SimpleReply::parse(&h).unwrap();
        let mut data = Vec::new();
        if r.error == 0 && read_len > 0 {
            data.resize(read_len, 0);
            self.s.read_exact(&mut data).await.unwrap();
        }
        (r.error, r.cookie, data)
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let cookie = self
            .send_request(Command::Write, offset, data.len() as u32, data)
            .await;
        let (err, c, _) = self.read_reply(0).await;
        assert_eq!(c, cookie);
        err
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let cookie = self.send_request(Command::Read, offset, len, &[]).await;
        let (err, c, data) = self.read_reply(len as usize).await;
        assert_eq!(c, cookie);
        if err == 0 {
            Ok(data)
        } else {
            Err(err)
        }
    }

    /// True when the server closes the connection (EOF, or a reset)
    /// within a deadline; whatever it sends before that is skipped.
    pub async fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 4096];
        let drain = async {
            loop {
                match self.s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_ok()
    }
}
