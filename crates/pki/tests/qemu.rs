//! QEMU itself (qemu-nbd as the TLS server, qemu-img as the client, both
//! GnuTLS) accepts the credential directories this crate writes and checks
//! the server's name; QEMU's server and this crate's rustls client
//! interoperate; QEMU's server refuses a client of another cluster. Skipped,
//! saying so, where qemu-nbd or qemu-img is not installed.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, DAY};
use tandem_pki::Role;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qemu-img info` through NBD over TLS with the client credentials in `dir`.
fn client_info(sock: &Path, dir: &Path, hostname: &str) -> std::process::Output {
    Command::new("qemu-img")
        .arg("info")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,path={},tls-creds=tls0,tls-hostname={hostname}",
            sock.display()
        ))
        .output()
        .unwrap()
}

#[test]
fn qemu_accepts_our_credentials_and_refuses_others() {
    if !have("qemu-nbd") || !have("qemu-img") {
        eprintln!("SKIPPED: qemu-nbd/qemu-img not installed");
        return;
    }
    let c = Cluster::new("prod");
    let other = Cluster::new("prod");
    let d = c.dir.path();
    let server_dir = d.join("qemu-a");
    let client_dir = d.join("qemu-b");
    c.ca.qemu_tls_dir(&server_dir, &c.ca.issue("host-a", Role::Host, DAY).unwrap())
        .unwrap();
    c.ca.qemu_tls_dir(&client_dir, &c.ca.issue("host-b", Role::Host, DAY).unwrap())
        .unwrap();

    let img = d.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = d.join("nbd.sock");
    let _server = Kill(
        Command::new("qemu-nbd")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                server_dir.display()
            ))
            .args([
                "--tls-creds",
                "tls0",
                "--persistent",
                "--read-only",
                "-f",
                "raw",
            ])
            .arg("--socket")
            .arg(&sock)
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("qemu-nbd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let ok = client_info(&sock, &client_dir, "host-a");
    assert!(
        ok.status.success(),
        "our host was refused: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("1 MiB"));

    let wrong_name = client_info(&sock, &client_dir, "host-c");
    assert!(
        !wrong_name.status.success(),
        "a wrong server name was accepted"
    );

    // rustls (this crate's client config) against QEMU's GnuTLS server: our
    // host is served; another cluster's host, which trusts our CA but has a
    // certificate of its own CA, is refused by QEMU itself.
    let b = c.identity("host-b", Role::Host);
    let revoked: std::sync::Arc<dyn tandem_pki::Revocations> =
        std::sync::Arc::new(tandem_pki::NoRevocations);
    let cfg = tandem_pki::client_config(&b, revoked).unwrap();
    nbd_list_over_tls(&sock, cfg).expect("QEMU refused our rustls client");

    let x = other.identity("host-x", Role::Host);
    let mut roots = tandem_pki::rustls::RootCertStore::empty();
    roots.add(c.ca.ca_der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(tandem_pki::rustls::crypto::ring::default_provider());
    let cfg = tandem_pki::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(x.cert_chain().to_vec(), x.private_key())
        .unwrap();
    let e = nbd_list_over_tls(&sock, std::sync::Arc::new(cfg)).unwrap_err();
    eprintln!("QEMU refused the intruder: {e}");
    server_logged(d, "known issuer");

    eprintln!(
        "QEMU's client refused a wrong name: {}",
        String::from_utf8_lossy(&wrong_name.stderr).trim()
    );
}

/// qemu-nbd serving a 1 MiB image on `sock` over TLS with the server
/// credentials in `dir`, requiring client certificates.
fn serve(d: &Path, dir: &Path, sock: &Path) -> Kill {
    let img = d.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let server = Kill(
        Command::new("qemu-nbd")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                dir.display()
            ))
            .args([
                "--tls-creds",
                "tls0",
                "--persistent",
                "--read-only",
                "-f",
                "raw",
            ])
            .arg("--socket")
            .arg(sock)
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("qemu-nbd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

#[test]
fn qemu_refuses_a_certificate_the_crl_revokes() {
    if !have("qemu-nbd") {
        eprintln!("SKIPPED: qemu-nbd not installed");
        return;
    }
    let c = Cluster::new("prod");
    let d = c.dir.path();
    let a = c.identity("host-a", Role::Host);
    let b = c.identity("host-b", Role::Host);
    let e = c.identity("host-e", Role::Host);
    let server_dir = d.join("qemu-a");
    a.qemu_tls_dir(&server_dir).unwrap();

    let list = tandem_pki::RevocationList::new();
    list.revoke(b.serial()).unwrap();
    let crl = c.ca.crl_pem(list.generation(), &list.serials()).unwrap();
    a.qemu_crl(&server_dir, &crl).unwrap();
    assert!(server_dir.join("ca-crl.pem").exists());

    let sock = d.join("nbd.sock");
    let _server = serve(d, &server_dir, &sock);
    let cfg = |id: &tandem_pki::Identity| {
        let none: std::sync::Arc<dyn tandem_pki::Revocations> =
            std::sync::Arc::new(tandem_pki::NoRevocations);
        tandem_pki::client_config(id, none).unwrap()
    };
    nbd_list_over_tls(&sock, cfg(&e)).expect("QEMU refused a host the CRL does not name");
    let err = nbd_list_over_tls(&sock, cfg(&b)).unwrap_err();
    eprintln!("QEMU refused the revoked host: {err}");
    server_logged(d, "The certificate has been revoked");
}

/// Waits for qemu-nbd (started by [`serve`] in `d`) to log `what`.
fn server_logged(d: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(d.join("qemu-nbd.log")).unwrap_or_default();
        if log.contains(what) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "qemu-nbd never logged {what:?}: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// NBD fixed-newstyle negotiation up to STARTTLS, a TLS handshake with
/// `cfg` (server name host-a), then NBD_OPT_LIST: `Ok` if QEMU answers
/// inside TLS.
fn nbd_list_over_tls(
    sock: &Path,
    cfg: std::sync::Arc<tandem_pki::rustls::ClientConfig>,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
    const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], IHAVEOPT);
    s.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
    let option = |opt: u32| {
        let mut m = IHAVEOPT.to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&0u32.to_be_bytes());
        m
    };
    s.write_all(&option(5))?; // NBD_OPT_STARTTLS
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply)?;
    assert_eq!(
        u64::from_be_bytes(reply[..8].try_into().unwrap()),
        REPLY_MAGIC
    );
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
        1,
        "STARTTLS not acked"
    );

    let conn =
        tandem_pki::rustls::ClientConnection::new(cfg, tandem_pki::server_name("host-a").unwrap())
            .map_err(std::io::Error::other)?;
    let mut tls = tandem_pki::rustls::StreamOwned::new(conn, s);
    tls.write_all(&option(3))?; // NBD_OPT_LIST
    tls.read_exact(&mut reply)?;
    assert_eq!(
        u64::from_be_bytes(reply[..8].try_into().unwrap()),
        REPLY_MAGIC
    );
    Ok(())
}
