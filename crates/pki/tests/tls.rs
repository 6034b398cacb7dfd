//! Real TLS handshakes (rustls on both ends, over in-memory pipes and
//! loopback TCP) between certificates of one cluster, of another, expired,
//! revoked and of each role.

mod common;

use std::sync::Arc;

use common::{none, pair, run, Cluster};
use tandem_pki::rustls::{self, CertificateError};
use tandem_pki::{
    accept, client_config, connect, peer_of, server_config, server_config_for_roles, PkiError,
    RevocationList, Revocations, Role,
};

fn is_cert_error(e: &PkiError, pred: impl Fn(&CertificateError) -> bool) -> bool {
    matches!(e, PkiError::Tls(rustls::Error::InvalidCertificate(c)) if pred(c))
}

#[tokio::test]
async fn good_host_certificates_are_accepted_and_peer_of_tells_who() {
    let c = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let b = c.identity("host-b", Role::Host);
    let out = pair(&a, none(), &b, none()).await;
    let seen_by_server = out.server.unwrap();
    let seen_by_client = out.client.unwrap();
    assert_eq!(seen_by_server.name, "host-b");
    assert_eq!(seen_by_server.role, Role::Host);
    assert_eq!(seen_by_server.cluster_id, c.ca.cluster_id());
    assert_eq!(seen_by_server.serial, b.serial());
    assert_eq!(seen_by_server.not_after, b.not_after());
    assert_eq!(seen_by_server, b.as_peer());
    assert_eq!(seen_by_client, a.as_peer());
}

#[tokio::test]
async fn over_loopback_tcp_too() {
    let c = Cluster::new("prod");
    let m = c.identity("mgr", Role::Manager);
    let h = c.identity("host-a", Role::Host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let scfg = server_config(&m, none()).unwrap();
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let (tls, peer) = accept(scfg, sock).await.unwrap();
        // The CommonState of the stream is what peer_of reads.
        assert_eq!(peer_of(tls.get_ref().1).unwrap(), peer);
        peer
    });
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_tls, server_peer) = connect(client_config(&h, none()).unwrap(), "mgr", sock)
        .await
        .unwrap();
    assert_eq!(server_peer.role, Role::Manager);
    let client_peer = server.await.unwrap();
    assert_eq!(client_peer.name, "host-a");
    assert_eq!(client_peer.role, Role::Host);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let c = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(a.ca_der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let anonymous = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let out = run(
        server_config(&a, none()).unwrap(),
        Arc::new(anonymous),
        "host-a",
    )
    .await;
    let e = out.server.unwrap_err();
    assert!(
        matches!(e, PkiError::Tls(rustls::Error::NoCertificatesPresented)),
        "{e}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn a_certificate_from_another_cluster_is_refused_both_ways() {
    let ours = Cluster::new("prod");
    let theirs = Cluster::new("prod"); // same name, different CA key
    assert_ne!(ours.ca.cluster_id(), theirs.ca.cluster_id());
    let a = ours.identity("host-a", Role::Host);
    let intruder = theirs.identity("host-b", Role::Host);

    // With its own cluster's config the intruder does not even accept our
    // server (its client sends the alert)...
    let out = pair(&a, none(), &intruder, none()).await;
    let e = out.client.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(c, CertificateError::UnknownIssuer)),
        "{e}"
    );
    assert!(out.server.is_err());

    // ...and an intruder that trusts anything (here: our CA, which is
    // public) is refused by our server.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(a.ca_der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(intruder.cert_chain().to_vec(), intruder.private_key())
        .unwrap();
    let out = run(server_config(&a, none()).unwrap(), Arc::new(cfg), "host-a").await;
    let e = out.server.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(c, CertificateError::UnknownIssuer)),
        "{e}"
    );
    assert!(out.client.is_err());

    // And a client of ours does not accept their server.
    let fake_server = theirs.identity("host-a", Role::Host);
    let out = pair(&fake_server, none(), &a, none()).await;
    let e = out.client.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(c, CertificateError::UnknownIssuer)),
        "{e}"
    );
    assert!(out.server.is_err());
}

#[tokio::test]
async fn a_self_made_certificate_claiming_our_cluster_id_is_refused() {
    let ours = Cluster::new("prod");
    let a = ours.identity("host-a", Role::Host);
    // Claims our cluster id in the URI, but nobody of ours signed it.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        format!("tandem://{}/operator/evil", ours.ca.cluster_id())
            .try_into()
            .unwrap(),
    ));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).unwrap();
    // Identity refuses it outright...
    let forged =
        tandem_pki::Identity::from_pem(&cert.pem(), &key.serialize_pem(), a.ca_pem().as_str());
    assert!(forged.is_err());
    // ...and a server refuses it in a handshake.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(a.ca_der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let out = run(server_config(&a, none()).unwrap(), Arc::new(cfg), "host-a").await;
    let e = out.server.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(
            c,
            CertificateError::UnknownIssuer | CertificateError::BadSignature
        )),
        "{e}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn an_expired_certificate_is_refused_both_ways() {
    let c = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let expired = c.identity_between("host-b", Role::Host, -3 * 86400, -86400);

    let out = pair(&a, none(), &expired, none()).await;
    let e = out.server.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(
            c,
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        )),
        "{e}"
    );
    assert!(out.client.is_err());

    let out = pair(&expired, none(), &a, none()).await;
    let e = out.client.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(
            c,
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        )),
        "{e}"
    );
}

#[tokio::test]
async fn a_not_yet_valid_certificate_is_refused() {
    let c = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let early = c.identity_between("host-b", Role::Host, 86400, 2 * 86400);
    let out = pair(&a, none(), &early, none()).await;
    let e = out.server.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(
            c,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
        )),
        "{e}"
    );
}

#[tokio::test]
async fn a_revoked_serial_is_refused_from_the_next_connection_on() {
    let c = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let b = c.identity("host-b", Role::Host);
    let revoked = Arc::new(RevocationList::new());
    let as_dyn: Arc<dyn Revocations> = revoked.clone();
    let scfg = server_config(&a, as_dyn.clone()).unwrap();
    let ccfg = client_config(&b, none()).unwrap();

    // Accepted before...
    let out = run(scfg.clone(), ccfg.clone(), "host-a").await;
    out.server.unwrap();
    out.client.unwrap();

    // ...refused after, with the same config (the list is live).
    revoked.revoke(b.serial()).unwrap();
    let out = run(scfg, ccfg, "host-a").await;
    let e = out.server.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(c, CertificateError::Revoked)),
        "{e}"
    );
    assert!(out.client.is_err());

    // A client refuses a revoked server too.
    let out = pair(&a, none(), &b, as_dyn.clone()).await;
    assert!(out.client.is_ok(), "a's serial is not revoked");
    revoked.revoke(a.serial()).unwrap();
    let out = pair(&a, none(), &b, as_dyn).await;
    let e = out.client.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(c, CertificateError::Revoked)),
        "{e}"
    );
}

#[tokio::test]
async fn the_role_is_visible_and_enforceable() {
    let c = Cluster::new("prod");
    let mgr = c.identity("mgr", Role::Manager);
    let host = c.identity("host-a", Role::Host);
    let op = c.identity("alice", Role::Operator);

    // The manager's API admits any role at the handshake; the role decides
    // what each call may do.
    let out = pair(&mgr, none(), &host, none()).await;
    let peer = out.server.unwrap();
    assert_eq!(peer.role, Role::Host);
    let e = peer.require_role(&[Role::Operator]).unwrap_err();
    assert!(
        matches!(
            e,
            PkiError::WrongRole {
                role: Role::Host,
                ..
            }
        ),
        "{e}"
    );

    let out = pair(&mgr, none(), &op, none()).await;
    let peer = out.server.unwrap();
    assert_eq!(peer.role, Role::Operator);
    assert_eq!(peer.name, "alice");
    peer.require_role(&[Role::Operator]).unwrap();

    // A listener restricted to hosts (replication) refuses the others at
    // the handshake.
    let hosts_only = server_config_for_roles(&host, none(), &[Role::Host]).unwrap();
    for who in [&op, &mgr] {
        let out = run(
            hosts_only.clone(),
            client_config(who, none()).unwrap(),
            "host-a",
        )
        .await;
        let e = out.server.unwrap_err();
        assert!(
            matches!(
                e.check_failure(),
                Some(PkiError::WrongRole { expected, .. }) if expected == "host"
            ),
            "{e}"
        );
        assert!(out.client.is_err());
    }
    let other_host = c.identity("host-b", Role::Host);
    let out = run(
        hosts_only,
        client_config(&other_host, none()).unwrap(),
        "host-a",
    )
    .await;
    assert_eq!(out.server.unwrap().name, "host-b");
}

#[tokio::test]
async fn operators_cannot_serve() {
    let c = Cluster::new("prod");
    let op = c.identity("alice", Role::Operator);
    assert!(matches!(
        server_config(&op, none()),
        Err(PkiError::WrongRole { .. })
    ));
    // Even with a hand-made rustls server config, a client of ours refuses
    // an operator certificate (no serverAuth usage).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(op.cert_chain().to_vec(), op.private_key())
        .unwrap();
    let host = c.identity("host-a", Role::Host);
    let out = run(
        Arc::new(cfg),
        client_config(&host, none()).unwrap(),
        "alice",
    )
    .await;
    let e = out.client.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(
            c,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
        )),
        "{e}"
    );
}

#[tokio::test]
async fn the_client_checks_the_server_name() {
    let c = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let b = c.identity("host-b", Role::Host);
    // b dials "host-c" but reaches a: refused, although a is of our cluster.
    let out = run(
        server_config(&a, none()).unwrap(),
        client_config(&b, none()).unwrap(),
        "host-c",
    )
    .await;
    let e = out.client.unwrap_err();
    assert!(
        is_cert_error(&e, |c| matches!(
            c,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )),
        "{e}"
    );
    // A bad name is refused before any connection.
    let (io, _) = tokio::io::duplex(1024);
    assert!(matches!(
        connect(client_config(&b, none()).unwrap(), "Not A Name", io).await,
        Err(PkiError::InvalidName { .. })
    ));
}

#[tokio::test]
async fn a_ca_restored_from_backup_keeps_trust() {
    let c = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let file = c.dir.path().join("ca.backup");
    c.ca.backup(&file, Some("a long passphrase")).unwrap();
    let restored =
        tandem_pki::ClusterCa::restore(&file, &c.dir.path().join("ca2"), Some("a long passphrase"))
            .unwrap();
    let issued = restored.issue("host-b", Role::Host, common::DAY).unwrap();
    let b = restored.identity(&issued).unwrap();
    let out = pair(&a, none(), &b, none()).await;
    assert_eq!(out.server.unwrap().name, "host-b");
    assert_eq!(out.client.unwrap().name, "host-a");
}

#[tokio::test]
async fn a_certificate_of_our_ca_naming_another_cluster_is_refused() {
    // Only reachable with the CA key: the defence-in-depth check after the
    // chain check, that the URI names this cluster.
    let c = Cluster::new("prod");
    let a = c.identity("host-a", Role::Host);
    let ca_dir = c.dir.path().join("ca");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
        ca_key,
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["host-b".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        format!("tandem://{}/host/host-b", "0".repeat(32))
            .try_into()
            .unwrap(),
    ));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2040, 1, 1);
    let cert = params.signed_by(&key, &issuer).unwrap();
    assert!(matches!(
        tandem_pki::Identity::from_pem(&cert.pem(), &key.serialize_pem(), &a.ca_pem()),
        Err(PkiError::WrongCluster { .. })
    ));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(a.ca_der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let out = run(server_config(&a, none()).unwrap(), Arc::new(cfg), "host-a").await;
    let e = out.server.unwrap_err();
    assert!(
        matches!(e.check_failure(), Some(PkiError::WrongCluster { .. })),
        "{e}"
    );
}
