//! The CA on disk: files and modes, loading, issuing, backup and restore,
//! QEMU's credential directory, standalone pairs, and garbage input.

mod common;

use std::fs;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};
use x509_parser::prelude::FromDer;

use common::{none, pair, Cluster, DAY};
use tandem_pki::{
    standalone_pair, standalone_renew, ClusterCa, Identity, PkiError, Role, IDENTITY_FILE,
    STANDALONE_VALIDITY,
};

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn create_writes_a_private_key_0600_in_a_0700_dir_and_refuses_to_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ca");
    let ca = ClusterCa::create(&dir, "prod").unwrap();
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.pem")), 0o644);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(ca.cluster_name(), "prod");
    assert_eq!(ca.cluster_id().len(), 32);
    assert!(ca.cluster_id().bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(fs::read_to_string(dir.join("ca.pem"))
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----\n"));

    let before = fs::read(dir.join("ca.key")).unwrap();
    assert!(matches!(
        ClusterCa::create(&dir, "prod"),
        Err(PkiError::AlreadyExists(_))
    ));
    assert_eq!(fs::read(dir.join("ca.key")).unwrap(), before);
    // Only the two files: nothing temporary left behind.
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);

    assert!(matches!(
        ClusterCa::create(&d.path().join("x"), "Bad Name"),
        Err(PkiError::InvalidName { .. })
    ));
}

#[test]
fn load_gives_the_same_cluster_and_checks_the_files() {
    let c = Cluster::new("prod");
    let dir = c.dir.path().join("ca");
    let loaded = ClusterCa::load(&dir).unwrap();
    assert_eq!(loaded.cluster_id(), c.ca.cluster_id());
    assert_eq!(loaded.cluster_name(), "prod");
    assert_eq!(loaded.ca_pem(), c.ca.ca_pem());
    // A certificate from the loaded CA is trusted by the original's nodes.
    let issued = loaded.issue("host-a", Role::Host, DAY).unwrap();
    Identity::from_issued(c.ca.ca_pem(), &issued).unwrap();

    // A key readable by others is refused.
    fs::set_permissions(dir.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        ClusterCa::load(&dir),
        Err(PkiError::InsecurePermissions { mode: 0o644, .. })
    ));
    fs::set_permissions(dir.join("ca.key"), fs::Permissions::from_mode(0o600)).unwrap();

    // Another CA's key beside this certificate is refused.
    let other = Cluster::new("prod");
    fs::copy(other.dir.path().join("ca/ca.key"), dir.join("ca.key")).unwrap();
    assert!(matches!(
        ClusterCa::load(&dir),
        Err(PkiError::KeyMismatch(_))
    ));

    // Missing files are an I/O error naming the file.
    let e = ClusterCa::load(&c.dir.path().join("nowhere")).unwrap_err();
    assert!(e.to_string().contains("nowhere"), "{e}");
}

#[test]
fn issued_certificates_carry_name_role_cluster_and_serial() {
    let c = Cluster::new("prod");
    let mut serials = std::collections::HashSet::new();
    for role in Role::ALL {
        let issued = c.ca.issue("node-1", role, DAY).unwrap();
        assert_eq!(issued.name, "node-1");
        assert_eq!(issued.role, role);
        assert_eq!(issued.serial.len(), 32);
        assert!(serials.insert(issued.serial.clone()));
        let left = issued.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(
            left <= DAY && left > DAY - Duration::from_secs(60),
            "{left:?}"
        );
        let id = c.ca.identity(&issued).unwrap();
        assert_eq!(id.name(), "node-1");
        assert_eq!(id.role(), role);
        assert_eq!(id.cluster_id(), c.ca.cluster_id());
        assert_eq!(id.cluster_name(), "prod");
        assert_eq!(id.serial(), issued.serial);
        assert!(!id.expires_within(Duration::from_secs(3600)));
        assert!(id.expires_within(30 * DAY));
        // The Debug forms do not print keys.
        assert!(!format!("{issued:?}{id:?}{:?}", c.ca).contains("PRIVATE"));
    }
    assert!(matches!(
        c.ca.issue("node-1", Role::Host, Duration::ZERO),
        Err(PkiError::Validity(_))
    ));
    assert!(matches!(
        c.ca.issue("node-1", Role::Host, 20 * 365 * DAY),
        Err(PkiError::Validity(_))
    ));
    assert!(matches!(
        c.ca.issue("node-1", Role::Host, Duration::MAX),
        Err(PkiError::Validity(_))
    ));
    assert!(matches!(
        c.ca.issue("-bad", Role::Host, DAY),
        Err(PkiError::InvalidName { .. })
    ));
    let renewed =
        c.ca.renew(&c.identity("node-2", Role::Manager), DAY)
            .unwrap();
    assert_eq!(
        (renewed.name.as_str(), renewed.role),
        ("node-2", Role::Manager)
    );
    let other = Cluster::new("other");
    assert!(matches!(
        c.ca.renew(&other.identity("node-2", Role::Host), DAY),
        Err(PkiError::WrongCluster { .. })
    ));
}

#[test]
fn identity_save_and_load_round_trip_with_a_0600_file() {
    let c = Cluster::new("prod");
    let id = c.identity("host-a", Role::Host);
    let dir = c.dir.path().join("id");
    id.save(&dir).unwrap();
    assert_eq!(mode(&dir.join(IDENTITY_FILE)), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let back = Identity::load(&dir).unwrap();
    assert_eq!(back.as_peer(), id.as_peer());
    assert_eq!(back.key_pem(), id.key_pem());
    assert_eq!(back.ca_pem(), id.ca_pem());

    // Saving a renewal replaces it.
    let renewed = c.ca.identity(&c.ca.renew(&id, DAY).unwrap()).unwrap();
    renewed.save(&dir).unwrap();
    assert_eq!(Identity::load(&dir).unwrap().serial(), renewed.serial());
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

    fs::set_permissions(dir.join(IDENTITY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        Identity::load(&dir),
        Err(PkiError::InsecurePermissions { .. })
    ));
}

#[test]
fn identity_parts_must_belong_together() {
    let c = Cluster::new("prod");
    let other = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let b = c.identity("host-b", Role::Host);
    // b's key with a's certificate.
    assert!(matches!(
        Identity::from_pem(&a.cert_pem(), &b.key_pem(), &a.ca_pem()),
        Err(PkiError::KeyMismatch(_))
    ));
    // a's certificate against another cluster's CA.
    assert!(Identity::from_pem(&a.cert_pem(), &a.key_pem(), other.ca.ca_pem()).is_err());
    // The CA certificate where the node certificate should be.
    assert!(Identity::from_pem(&a.ca_pem(), &a.key_pem(), &a.ca_pem()).is_err());
    // A node certificate where the CA's should be.
    assert!(Identity::from_pem(&a.cert_pem(), &a.key_pem(), &b.cert_pem()).is_err());
}

#[test]
fn unencrypted_backup_is_0600_says_so_and_restores() {
    let c = Cluster::new("prod");
    let file = c.dir.path().join("backup.pem");
    let info = c.ca.backup(&file, None).unwrap();
    assert!(!info.encrypted);
    assert!(info.warning().unwrap().contains("NOT ENCRYPTED"));
    assert_eq!(mode(&file), 0o600);
    let text = fs::read_to_string(&file).unwrap();
    assert!(text.contains("NOT ENCRYPTED"));
    assert!(text.contains("PRIVATE KEY"));
    // Never over an existing file.
    assert!(matches!(
        c.ca.backup(&file, None),
        Err(PkiError::AlreadyExists(_))
    ));

    let dir = c.dir.path().join("restored");
    let r = ClusterCa::restore(&file, &dir, None).unwrap();
    assert_eq!(r.cluster_id(), c.ca.cluster_id());
    assert_eq!(r.cluster_name(), "prod");
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(
        ClusterCa::load(&dir).unwrap().cluster_id(),
        c.ca.cluster_id()
    );
    // Restoring over an existing CA is refused.
    assert!(matches!(
        ClusterCa::restore(&file, &dir, None),
        Err(PkiError::AlreadyExists(_))
    ));
}

#[test]
fn encrypted_backup_needs_its_passphrase() {
    let c = Cluster::new("prod");
    let file = c.dir.path().join("backup.enc");
    assert!(matches!(
        c.ca.backup(&file, Some("short")),
        Err(PkiError::Backup { .. })
    ));
    let info = c.ca.backup(&file, Some("correct horse battery")).unwrap();
    assert!(info.encrypted);
    assert!(info.warning().is_none());
    assert_eq!(mode(&file), 0o600);
    let text = fs::read_to_string(&file).unwrap();
    assert!(!text.contains("PRIVATE KEY"));
    assert!(!text.contains("BEGIN CERTIFICATE"));
    assert!(text.contains(c.ca.cluster_id()));

    let dir = c.dir.path().join("restored");
    assert!(matches!(
        ClusterCa::restore(&file, &dir, None),
        Err(PkiError::PassphraseRequired(_))
    ));
    assert!(matches!(
        ClusterCa::restore(&file, &dir, Some("wrong horse battery")),
        Err(PkiError::BadPassphrase(_))
    ));
    assert!(!dir.join("ca.key").exists());
    let r = ClusterCa::restore(&file, &dir, Some("correct horse battery")).unwrap();
    assert_eq!(r.cluster_id(), c.ca.cluster_id());
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
}

#[test]
fn qemu_tls_dir_has_the_files_qemu_expects_with_private_keys() {
    let c = Cluster::new("prod");
    let issued = c.ca.issue("host-a", Role::Host, DAY).unwrap();
    let out = c.dir.path().join("qemu");
    c.ca.qemu_tls_dir(&out, &issued).unwrap();
    let mut names: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ca-cert.pem",
            "client-cert.pem",
            "client-key.pem",
            "server-cert.pem",
            "server-key.pem"
        ]
    );
    assert_eq!(mode(&out), 0o700);
    for (f, m) in [
        ("ca-cert.pem", 0o644),
        ("server-cert.pem", 0o644),
        ("client-cert.pem", 0o644),
        ("server-key.pem", 0o600),
        ("client-key.pem", 0o600),
    ] {
        assert_eq!(mode(&out.join(f)), m, "{f}");
    }
    let read = |f: &str| fs::read_to_string(out.join(f)).unwrap();
    assert_eq!(read("ca-cert.pem"), c.ca.ca_pem());
    let id = Identity::from_pem(
        &read("server-cert.pem"),
        &read("server-key.pem"),
        &read("ca-cert.pem"),
    )
    .unwrap();
    assert_eq!(id.serial(), issued.serial);
    Identity::from_pem(
        &read("client-cert.pem"),
        &read("client-key.pem"),
        &read("ca-cert.pem"),
    )
    .unwrap();
    // Rewriting (after a renewal) replaces the files.
    let renewed = c.ca.issue("host-a", Role::Host, DAY).unwrap();
    c.ca.qemu_tls_dir(&out, &renewed).unwrap();
    assert_eq!(fs::read_dir(&out).unwrap().count(), 5);
    assert!(read("server-cert.pem").contains(renewed.cert_pem.trim()));

    let op = c.ca.issue("alice", Role::Operator, DAY).unwrap();
    assert!(matches!(
        c.ca.qemu_tls_dir(&c.dir.path().join("q2"), &op),
        Err(PkiError::WrongRole { .. })
    ));
}

#[tokio::test]
async fn standalone_pair_issues_two_year_long_host_certificates_and_renews() {
    let d = tempfile::tempdir().unwrap();
    let pair_dir = d.path().join("pair");
    let made = standalone_pair(&pair_dir, "host-a", "host-b").unwrap();
    assert_eq!(made.hosts.len(), 2);
    assert_eq!(mode(&pair_dir.join("ca/ca.key")), 0o600);
    let a = Identity::load(&made.hosts[0].1).unwrap();
    let b = Identity::load(&made.hosts[1].1).unwrap();
    assert_eq!((a.name(), b.name()), ("host-a", "host-b"));
    assert_eq!((a.role(), b.role()), (Role::Host, Role::Host));
    assert_eq!(a.cluster_id(), made.cluster_id);
    let left = a.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(left > STANDALONE_VALIDITY - Duration::from_secs(60) && left <= STANDALONE_VALIDITY);
    assert!(!a.expires_within(30 * DAY));

    // The two hosts talk to each other.
    let out = pair(&a, none(), &b, none()).await;
    assert_eq!(out.server.unwrap().name, "host-b");
    assert_eq!(out.client.unwrap().name, "host-a");

    assert!(matches!(
        standalone_pair(&pair_dir, "host-a", "host-b"),
        Err(PkiError::AlreadyExists(_))
    ));
    assert!(standalone_pair(&d.path().join("p2"), "same", "same").is_err());

    let renewed = standalone_renew(&pair_dir).unwrap();
    assert_eq!(renewed.cluster_id, made.cluster_id);
    let a2 = Identity::load(&made.hosts[0].1).unwrap();
    assert_eq!(a2.name(), "host-a");
    assert_ne!(a2.serial(), a.serial());
    // Old and new certificates of the pair still talk to each other.
    let out = pair(&a2, none(), &b, none()).await;
    out.server.unwrap();
    out.client.unwrap();
}

#[test]
fn garbage_pem_is_an_error_not_a_panic() {
    let c = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let garbage = [
        "",
        "hello",
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        "-----BEGIN PRIVATE KEY-----\naGVsbG8=\n-----END PRIVATE KEY-----\n",
        "-----BEGIN CERTIFICATE-----\naGVsbG8=\n",
        "-----BEGIN EC PRIVATE KEY-----\naGVsbG8=\n-----END EC PRIVATE KEY-----\n",
    ];
    for g in garbage {
        assert!(
            Identity::from_pem(g, &a.key_pem(), &a.ca_pem()).is_err(),
            "{g:?}"
        );
        assert!(
            Identity::from_pem(&a.cert_pem(), g, &a.ca_pem()).is_err(),
            "{g:?}"
        );
        assert!(
            Identity::from_pem(&a.cert_pem(), &a.key_pem(), g).is_err(),
            "{g:?}"
        );

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ca.pem"), g).unwrap();
        fs::write(dir.path().join("ca.key"), g).unwrap();
        fs::set_permissions(dir.path().join("ca.key"), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ClusterCa::load(dir.path()).is_err());
        fs::write(dir.path().join(IDENTITY_FILE), g).unwrap();
        fs::set_permissions(
            dir.path().join(IDENTITY_FILE),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert!(Identity::load(dir.path()).is_err());
        fs::write(dir.path().join("backup"), g).unwrap();
        assert!(ClusterCa::restore(
            &dir.path().join("backup"),
            &dir.path().join("r"),
            Some("passphrase")
        )
        .is_err());
    }
    // Binary junk and an oversized file.
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(IDENTITY_FILE), [0xffu8, 0xfe, 0, 1, 2]).unwrap();
    fs::set_permissions(
        dir.path().join(IDENTITY_FILE),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    assert!(Identity::load(dir.path()).is_err());
    fs::write(dir.path().join(IDENTITY_FILE), vec![b'a'; 2 << 20]).unwrap();
    assert!(Identity::load(dir.path()).is_err());
}

#[test]
fn crls_name_the_revoked_serials_and_must_come_from_our_ca() {
    let c = Cluster::new("prod");
    let other = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let serials = vec![a.serial().to_string(), "0a:bc".to_string()];
    let crl = c.ca.crl_pem(7, &serials).unwrap();
    assert!(crl.starts_with("-----BEGIN X509 CRL-----\n"));
    let der = pem::parse(&crl).unwrap().into_contents();
    let (_, parsed) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
    let mut listed: Vec<String> = parsed
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    listed.sort();
    let mut want = vec![a.serial().to_string(), "0abc".to_string()];
    want.sort();
    assert_eq!(listed, want);
    assert_eq!(parsed.crl_number().unwrap().to_string(), "7");

    let out = c.dir.path().join("q");
    a.qemu_crl(&out, &crl).unwrap();
    assert_eq!(mode(&out.join("ca-crl.pem")), 0o644);
    // Another cluster's CRL, a certificate, or garbage: refused.
    let theirs = other.ca.crl_pem(1, &[]).unwrap();
    assert!(a.qemu_crl(&out, &theirs).is_err());
    assert!(a.qemu_crl(&out, &a.cert_pem()).is_err());
    assert!(a.qemu_crl(&out, "junk").is_err());
    assert!(c.ca.crl_pem(1, &["xyz".to_string()]).is_err());
}
