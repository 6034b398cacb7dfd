//! A backup that knows who may replicate to it: over mutual TLS with the
//! cluster's certificates, only the VM's recorded primary is admitted.
//! While the primary's link is cut, a third host with a *valid* host
//! certificate presents the VM's identity and generation: it is refused,
//! and the replica is untouched. With the authority check switched off
//! (fault injection) the same script writes into the replica.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_pki::{ClusterCa, Identity, NoRevocations, Role};
use tandem_replication::assembler::EpochBuilder;
use tandem_replication::authority::{RecordedPrimaries, VmAuthority};
use tandem_replication::backup::{Activate, ActivateError, Backup, BackupConfig};
use tandem_replication::link::{authenticate, Connect, Endpoint, Listener, TlsEndpoint};
use tandem_replication::wire::{self, Frame, FrameKind, Hello, PAGE_SIZE};
use tokio::io::AsyncWriteExt;

const RAM: u64 = 16 * PAGE_SIZE as u64;
const VM_UUID: &str = "3c1e9a52-7b2d-4e8f-9a10-5d6c7b8a9f01";

struct NeverActivate;
impl Activate for NeverActivate {
    fn activate(
        &self,
        _vm: String,
        _dir: PathBuf,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ActivateError>> + Send>>
    {
        panic!("no takeover in these tests")
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    ca: ClusterCa,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(&dir.path().join("ca"), "prod").unwrap();
        Cluster { dir, ca }
    }
    fn host(&self, name: &str) -> Identity {
        let issued = self
            .ca
            .issue(name, Role::Host, Duration::from_secs(3600))
            .unwrap();
        self.ca.identity(&issued).unwrap()
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("replicas")
    }
}

/// Backup `host-b`, listening with TLS, with `web`'s authority record:
/// primary `host-a`, generation 0.
async fn backup(c: &Cluster, skip_authority: bool) -> Endpoint {
    let mut records = RecordedPrimaries {
        this_host: "host-b".into(),
        ..Default::default()
    };
    records.vms.insert(
        VM_UUID.into(),
        VmAuthority {
            name: "web".into(),
            primary: "host-a".into(),
            backup: "host-b".into(),
            generation: 0,
        },
    );
    let mut cfg = BackupConfig::new(c.root());
    cfg.auto_failover = false;
    cfg.authority = Arc::new(records);
    cfg.faults.skip_authority = skip_authority;
    let backup = Backup::new(cfg, Arc::new(NeverActivate));
    let tls = tandem_pki::server_config(&c.host("host-b"), Arc::new(NoRevocations)).unwrap();
    let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into()))
        .await
        .unwrap();
    let ep = Endpoint::Tcp(listener.local_addr().unwrap().to_string());
    tokio::spawn(async move {
        while let Ok((conn, addr)) = listener.accept().await {
            let (b, tls) = (backup.clone(), tls.clone());
            tokio::spawn(async move {
                if let Ok((conn, who)) = authenticate(conn, addr, Some(&tls)).await {
                    b.serve_peer(conn, who).await;
                }
            });
        }
    });
    ep
}

fn hello(instance: u64) -> Hello {
    Hello {
        vm: "web".into(),
        uuid: VM_UUID.into(),
        generation: 0,
        instance,
        ram_size: RAM,
        page_size: PAGE_SIZE as u64,
        spec_toml: "name = \"web\"".into(),
        disks: vec![],
    }
}

/// Dials the backup as `me` (TLS, expecting `host-b`), says `hello` and
/// sends epochs `base+1..=base+n` filled with `fill`, each waited for.
/// `Err` with the backup's reason when the hello is refused.
async fn replicate(
    c: &Cluster,
    ep: &Endpoint,
    me: &str,
    hello: &Hello,
    n: u64,
    fill: u8,
) -> Result<u64, String> {
    let link = TlsEndpoint {
        endpoint: ep.clone(),
        peer_name: "host-b".into(),
        client: tandem_pki::client_config(&c.host(me), Arc::new(NoRevocations)).unwrap(),
    };
    let mut s = link.connect().await.map_err(|e| e.to_string())?;
    let f = Frame::new(FrameKind::Hello, 0, 0, serde_json::to_vec(hello).unwrap());
    s.write_all(&f.encode()).await.unwrap();
    let answer = next_frame(&mut s).await.ok_or("hung up at hello")?;
    if answer.kind == FrameKind::Resync {
        return Err(answer.reason());
    }
    assert_eq!(answer.kind, FrameKind::Committed);
    let base = answer.epoch;
    // The replica's digest, then the epochs.
    let mut digest = wire::DigestCollector::default();
    while let Some(f) = next_frame(&mut s).await {
        if f.kind == FrameKind::ReplicaDigest
            && wire::ReplicaDigest::decode(&f.payload)
                .ok()
                .is_some_and(|d| digest.push(d).unwrap_or(true))
        {
            break;
        }
    }
    for e in base + 1..=base + n {
        let pages = [0u64, 5];
        let data = vec![fill; pages.len() * PAGE_SIZE];
        let frames = EpochBuilder::build(RAM, e, &pages, &data, b"device", &[]);
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend(f.encode());
        }
        s.write_all(&bytes).await.unwrap();
        loop {
            let f = tokio::time::timeout(Duration::from_secs(10), wire::read_frame(&mut s))
                .await
                .expect("the backup answers")
                .map_err(|e| e.to_string())?
                .ok_or("hung up")?;
            if f.kind == FrameKind::Committed && f.epoch == e {
                break;
            }
            if f.kind == FrameKind::Resync {
                return Err(f.reason());
            }
        }
    }
    Ok(base + n)
}

/// The next frame that is not a heartbeat; `None` on EOF or an error.
async fn next_frame(s: &mut tandem_replication::link::BoxStream) -> Option<Frame> {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), wire::read_frame(s))
            .await
            .expect("the backup answers")
            .ok()
            .flatten()?;
        if f.kind != FrameKind::Heartbeat {
            return Some(f);
        }
    }
}

fn fingerprint(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The recorded primary replicates, its link is cut, and host-c (valid
/// certificate, same VM identity and generation) tries. Returns host-c's
/// answer and whether the replica changed.
async fn intruder_with_a_valid_certificate(skip_authority: bool) -> (Result<u64, String>, bool) {
    let c = Cluster::new();
    let ep = backup(&c, skip_authority).await;
    assert_eq!(
        replicate(&c, &ep, "host-a", &hello(1), 2, 0xa1).await,
        Ok(2)
    );
    // The link is cut: host-a's connection is gone.
    let replica = c.root().join("web");
    let before = fingerprint(&replica);
    // Until the backup has seen host-a's connection end, any second
    // primary is refused for that reason alone: wait that out (bounded).
    let mut answer = replicate(&c, &ep, "host-c", &hello(9), 1, 0xc3).await;
    for _ in 0..100 {
        match &answer {
            Err(why) if why.contains("is connected and alive") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                answer = replicate(&c, &ep, "host-c", &hello(9), 1, 0xc3).await;
            }
            _ => break,
        }
    }
    let after = fingerprint(&replica);
    (answer, before != after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certified_host_that_is_not_the_recorded_primary_is_refused() {
    let (answer, touched) = intruder_with_a_valid_certificate(false).await;
    let why = answer.expect_err("refused");
    assert!(why.contains("not the recorded primary"), "{why}");
    assert!(!touched, "the refused host changed the replica");
}

/// The twin: without the authority check the same script writes into the
/// replica, so the test above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_authority_check_the_intruder_writes_the_replica() {
    let (answer, touched) = intruder_with_a_valid_certificate(true).await;
    assert_eq!(answer, Ok(3));
    assert!(touched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clusters_host_cannot_even_connect() {
    let c = Cluster::new();
    let ep = backup(&c, false).await;
    let stranger = Cluster::new();
    let link = TlsEndpoint {
        endpoint: ep,
        peer_name: "host-b".into(),
        client: tandem_pki::client_config(&stranger.host("host-a"), Arc::new(NoRevocations))
            .unwrap(),
    };
    assert!(link.connect().await.is_err());
    assert!(!c.root().join("web").exists());
}
