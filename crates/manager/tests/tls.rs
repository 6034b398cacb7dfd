//! The manager over real TLS on 127.0.0.1: who may call what.
//!
//! Each case makes a real handshake against a running manager: no
//! certificate, another cluster's, an expired one, a revoked one, and
//! valid certificates of the wrong role. Waits are bounded; nothing sleeps.

mod common;

use std::time::{Duration, SystemTime};

use common::{bounded, raw_config, raw_request, Harness, BOUND};
use tandem_manager::api::{
    Ack, AuthorityRecord, ClusterStatus, CreateVmRequest, ErrorKind, HandoverRequest,
    HeartbeatRequest, HeartbeatResponse, HostAuthority, HostView, Inventory,
    RegisterPrimaryRequest, RemovedHost, Revocations, RevokeRequest, TakeoverRequest,
};
use tandem_manager::client::{join, ClientError};
use tandem_manager::model::JoinToken;
use tandem_pki::{ClusterCa, Role};
use uuid::Uuid;

/// The operator endpoints, one of each kind.
const OPERATOR_CALLS: &[(&str, &str)] = &[
    ("GET", "/v1/hosts"),
    ("GET", "/v1/tokens"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/vms"),
    ("DELETE", "/v1/hosts/host-a"),
    ("GET", "/v1/cluster/dump"),
    ("GET", "/v1/dvs"),
    ("POST", "/v1/dvs/apply"),
    ("POST", "/v1/dvs/rollback"),
    ("GET", "/v1/dvs/history"),
    ("GET", "/v1/dvs/revisions/1"),
    ("POST", "/v1/vms"),
    (
        "POST",
        "/v1/vms/6f1c8a52-4a4e-4f4e-9d0c-3b1a2c3d4e5f/handover",
    ),
];

/// The host endpoints.
const HOST_CALLS: &[(&str, &str)] = &[
    ("POST", "/v1/host/heartbeat"),
    ("PUT", "/v1/host/inventory"),
    ("GET", "/v1/host/authority"),
    ("POST", "/v1/host/renew"),
    ("POST", "/v1/host/switch-sync"),
    ("POST", "/v1/host/vms"),
    (
        "POST",
        "/v1/host/vms/6f1c8a52-4a4e-4f4e-9d0c-3b1a2c3d4e5f/takeover",
    ),
];

fn all_calls() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    OPERATOR_CALLS.iter().chain(HOST_CALLS)
}

fn assert_tls_refused(r: Result<(u16, String), String>, what: &str) {
    match r {
        Err(_) => {}
        Ok((status, body)) => panic!("{what}: the manager answered {status}: {body}"),
    }
}

#[tokio::test]
async fn no_certificate_no_api() {
    let h = Harness::start().await;
    let cfg = raw_config(&h.operator, None);
    for (m, p) in all_calls() {
        assert_tls_refused(
            raw_request(&h.addr(), cfg.clone(), m, p).await,
            &format!("{m} {p} without a certificate"),
        );
    }
    // Plain HTTP is not TLS: nothing is served.
    let plain = bounded("plain http", async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
        s.write_all(b"GET /v1/hosts HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await;
    assert!(!plain.contains("HTTP/1.1 200"), "{plain}");
}

#[tokio::test]
async fn another_clusters_certificate_is_refused() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let other = ClusterCa::create(&dir.path().join("ca"), "other").unwrap();
    for role in [Role::Host, Role::Operator] {
        // Same names as in our cluster, so only the CA differs.
        let name = if role == Role::Host {
            "host-a"
        } else {
            "admin"
        };
        let id = other
            .identity(&other.issue(name, role, Duration::from_secs(3600)).unwrap())
            .unwrap();
        // It trusts our CA (so the client side is satisfied) but presents
        // its own cluster's certificate: the manager must refuse it.
        let cfg = raw_config(&h.operator, Some(&id));
        for (m, p) in all_calls() {
            assert_tls_refused(
                raw_request(&h.addr(), cfg.clone(), m, p).await,
                &format!("{m} {p} with another cluster's {role} certificate"),
            );
        }
        // And the normal client, which trusts only its own cluster, does
        // not accept this manager either.
        let err = h
            .client(&id)
            .get::<Vec<HostView>>("/v1/hosts")
            .await
            .unwrap_err();
        assert!(err.is_tls(), "{err:?}");
    }
}

#[tokio::test]
async fn expired_certificates_are_refused() {
    let h = Harness::start().await;
    // A member host whose certificate has expired: issue one for its name.
    let joined = h.join("host-a").await;
    let now = SystemTime::now();
    for role in [Role::Host, Role::Operator] {
        let name = if role == Role::Host {
            "host-a"
        } else {
            "admin"
        };
        let issued =
            h.ca.issue_between(
                name,
                role,
                now - Duration::from_secs(7200),
                now - Duration::from_secs(60),
            )
            .unwrap();
        let expired = h.ca.identity(&issued).unwrap();
        let cfg = raw_config(&h.operator, Some(&expired));
        for (m, p) in all_calls() {
            assert_tls_refused(
                raw_request(&h.addr(), cfg.clone(), m, p).await,
                &format!("{m} {p} with an expired {role} certificate"),
            );
        }
    }
    // The host's real certificate still works.
    let _: HeartbeatResponse = h
        .client(&joined.identity)
        .post("/v1/host/heartbeat", &HeartbeatRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn host_remove_revokes_at_once_and_a_revoked_operator_is_refused() {
    let h = Harness::start().await;
    let joined = h.join("host-a").await;
    let host = h.client(&joined.identity);
    let _: HeartbeatResponse = host
        .post("/v1/host/heartbeat", &HeartbeatRequest::default())
        .await
        .unwrap();
    // Renew once, so that two certificates are live.
    let renewed: tandem_manager::api::Credentials = host.post("/v1/host/renew", &()).await.unwrap();
    let renewed_id =
        tandem_pki::Identity::from_pem(&renewed.cert_pem, &renewed.key_pem, &renewed.ca_pem)
            .unwrap();

    let removed: RemovedHost = h
        .operator_client()
        .delete("/v1/hosts/host-a")
        .await
        .unwrap();
    assert_eq!(removed.revoked.len(), 2);
    for id in [&joined.identity, &renewed_id] {
        let cfg = raw_config(&h.operator, Some(id));
        for (m, p) in all_calls() {
            assert_tls_refused(
                raw_request(&h.addr(), cfg.clone(), m, p).await,
                &format!("{m} {p} with a revoked host certificate"),
            );
        }
    }
    // The revocation list served to hosts and operators has them.
    let list: Revocations = h.operator_client().get("/v1/revocations").await.unwrap();
    for s in &removed.revoked {
        assert!(list.serials.contains(s));
    }
    assert_eq!(list.generation, removed.revocation_generation);

    // A lost operator certificate: revoke it by serial.
    let lost = h.issue("lost-laptop", Role::Operator);
    let _: Vec<HostView> = h.client(&lost).get("/v1/hosts").await.unwrap();
    let _: Revocations = h
        .operator_client()
        .post(
            "/v1/revocations",
            &RevokeRequest {
                serial: lost.serial().into(),
                name: "lost-laptop".into(),
                not_after: 0,
                reason: "lost".into(),
            },
        )
        .await
        .unwrap();
    let err = h
        .client(&lost)
        .get::<Vec<HostView>>("/v1/hosts")
        .await
        .unwrap_err();
    assert!(err.is_tls(), "{err:?}");
}

#[tokio::test]
async fn roles_host_cannot_do_operator_things_and_vice_versa() {
    let h = Harness::start().await;
    let joined = h.join("host-a").await;
    let host = h.client(&joined.identity);
    let op = h.operator_client();

    // Host certificate → operator endpoints: 403 forbidden, every one.
    let cfg = raw_config(&h.operator, Some(&joined.identity));
    for (m, p) in OPERATOR_CALLS {
        let (status, body) = raw_request(&h.addr(), cfg.clone(), m, p).await.unwrap();
        assert_eq!(status, 403, "host calling {m} {p}: {body}");
        assert!(body.contains("forbidden"), "{body}");
    }
    let e = host
        .post::<_, tandem_manager::api::CreatedToken>(
            "/v1/tokens",
            &tandem_manager::api::CreateTokenRequest::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{e}");
    // The operator certificate can.
    let _: Vec<HostView> = op.get("/v1/hosts").await.unwrap();

    // Operator (and manager) certificates → host endpoints: 403.
    let other_manager = h.issue("manager-2", Role::Manager);
    for id in [&h.operator, &other_manager] {
        let cfg = raw_config(&h.operator, Some(id));
        for (m, p) in HOST_CALLS {
            let (status, body) = raw_request(&h.addr(), cfg.clone(), m, p).await.unwrap();
            assert_eq!(status, 403, "{} calling {m} {p}: {body}", id.role());
        }
    }
    // A manager certificate is no operator either.
    let cfg = raw_config(&h.operator, Some(&other_manager));
    for (m, p) in OPERATOR_CALLS {
        let (status, _) = raw_request(&h.addr(), cfg.clone(), m, p).await.unwrap();
        assert_eq!(status, 403, "manager calling {m} {p}");
    }
    // A valid host certificate of this cluster that was not issued through
    // a join (not a member) cannot use the host API.
    let stray = h.issue("host-z", Role::Host);
    let e = h
        .client(&stray)
        .post::<_, HeartbeatResponse>("/v1/host/heartbeat", &HeartbeatRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{e}");
    // Nor can a member's name with a certificate the manager did not issue to it.
    let forged = h.issue("host-a", Role::Host);
    let e = h
        .client(&forged)
        .get::<HostAuthority>("/v1/host/authority")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{e}");
}

#[tokio::test]
async fn join_works_once_and_only_with_the_pinned_ca() {
    let h = Harness::start().await;
    let t: JoinToken = h.token(None).await.token.parse().unwrap();
    let joined = join(&h.addr(), &t, "host-a", BOUND).await.unwrap();
    assert_eq!(joined.identity.name(), "host-a");
    assert_eq!(joined.identity.role(), Role::Host);
    assert_eq!(joined.identity.cluster_id(), h.ca.cluster_id());
    assert_eq!(joined.endpoint.name, "manager");
    // The certificate lives 24 h and is to be renewed at 2/3.
    let life = joined
        .identity
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(life > Duration::from_secs(23 * 3600) && life <= Duration::from_secs(24 * 3600));
    assert_eq!(
        joined.credentials.not_after - joined.credentials.renew_after,
        8 * 3600
    );
    // The new certificate works at once.
    let _: HeartbeatResponse = h
        .client(&joined.identity)
        .post("/v1/host/heartbeat", &HeartbeatRequest::default())
        .await
        .unwrap();

    // Second use of the same token: refused.
    let again = join(&h.addr(), &t, "host-b", BOUND).await.unwrap_err();
    assert_eq!(again.kind(), Some(ErrorKind::Unauthorized), "{again:?}");

    // A token whose CA hash is not this manager's CA: the joining side
    // refuses the manager before sending the token.
    let t2: JoinToken = h.token(None).await.token.parse().unwrap();
    let s = t2.to_string();
    let wrong: JoinToken = format!("{}{}", &s[..s.len() - 64], "ab".repeat(32))
        .parse()
        .unwrap();
    let e = join(&h.addr(), &wrong, "host-b", BOUND).await.unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
    // ... and the good token was not used up by that.
    join(&h.addr(), &t2, "host-b", BOUND).await.unwrap();

    let hosts: Vec<HostView> = h.operator_client().get("/v1/hosts").await.unwrap();
    let names: Vec<_> = hosts.iter().map(|h| h.record.name.as_str()).collect();
    assert_eq!(names, ["host-a", "host-b"]);
}

#[tokio::test]
async fn a_join_connection_reaches_nothing_but_join() {
    let h = Harness::start().await;
    // Offer the join ALPN, present no certificate, trust the CA.
    let mut cfg = (*raw_config(&h.operator, None)).clone();
    cfg.alpn_protocols = vec![tandem_manager::api::JOIN_ALPN.to_vec()];
    let cfg = std::sync::Arc::new(cfg);
    for (m, p) in all_calls() {
        let (status, body) = raw_request(&h.addr(), cfg.clone(), m, p).await.unwrap();
        assert_eq!(status, 404, "{m} {p} on a join connection: {body}");
    }
    let (status, body) = raw_request(&h.addr(), cfg, "POST", "/v1/join")
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn restart_keeps_hosts_authority_and_revocations() {
    let mut h = Harness::start().await;
    let a = h.join("host-a").await;
    let b = h.join("host-b").await;
    let c = h.join("host-c").await;
    let inv = Inventory {
        tandem_version: "0.1.0".into(),
        ..Default::default()
    };
    let _: Ack = h
        .client(&a.identity)
        .put("/v1/host/inventory", &inv)
        .await
        .unwrap();
    let uuid = Uuid::new_v4();
    let op = h.operator_client();
    let rec: AuthorityRecord = op
        .post(
            "/v1/vms",
            &CreateVmRequest {
                uuid,
                name: "web".into(),
                primary: "host-a".into(),
                backup: Some("host-b".into()),
            },
        )
        .await
        .unwrap();
    let rec: AuthorityRecord = op
        .post(
            &format!("/v1/vms/{uuid}/handover"),
            &HandoverRequest {
                expected_generation: rec.generation,
                primary: "host-b".into(),
                backup: Some("host-a".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(rec.generation, 2);
    let removed: RemovedHost = op.delete("/v1/hosts/host-c").await.unwrap();
    let unused = h.token(None).await;

    h.restart().await;

    let op = h.operator_client();
    let hosts: Vec<HostView> = op.get("/v1/hosts").await.unwrap();
    let names: Vec<_> = hosts.iter().map(|h| h.record.name.as_str()).collect();
    assert_eq!(names, ["host-a", "host-b"]);
    assert_eq!(hosts[0].record.inventory.as_ref(), Some(&inv));
    assert_eq!(
        op.get::<AuthorityRecord>(&format!("/v1/vms/{uuid}"))
            .await
            .unwrap(),
        rec
    );
    let list: Revocations = op.get("/v1/revocations").await.unwrap();
    assert_eq!(list.generation, removed.revocation_generation);
    // The removed host is still refused at the handshake; the others work.
    let cfg = raw_config(&h.operator, Some(&c.identity));
    assert_tls_refused(
        raw_request(&h.addr(), cfg, "POST", "/v1/host/heartbeat").await,
        "a host removed before the restart",
    );
    let hb: HeartbeatResponse = h
        .client(&b.identity)
        .post("/v1/host/heartbeat", &HeartbeatRequest::default())
        .await
        .unwrap();
    // A new manager has no inventory from this run: it asks for it.
    assert!(hb.inventory_wanted);
    let mine: HostAuthority = h
        .client(&b.identity)
        .get("/v1/host/authority")
        .await
        .unwrap();
    assert_eq!(mine.vms, vec![rec]);
    // The token made before the restart still joins.
    join(&h.addr(), &unused.token.parse().unwrap(), "host-d", BOUND)
        .await
        .unwrap();
    let status: ClusterStatus = op.get("/v1/cluster").await.unwrap();
    assert_eq!(status.hosts, 3);
    assert_eq!(status.vms, 1);
    assert!(status.manager_cert_not_after > status.manager_time);
    assert!(status.store.starts_with("redb "), "{}", status.store);
}

#[tokio::test]
async fn hosts_see_only_their_own_authority_records() {
    let h = Harness::start().await;
    let a = h.join("host-a").await;
    let b = h.join("host-b").await;
    let c = h.join("host-c").await;
    let op = h.operator_client();
    let (u1, u2) = (Uuid::new_v4(), Uuid::new_v4());
    for (u, p, bk) in [(u1, "host-a", "host-b"), (u2, "host-b", "host-c")] {
        let _: AuthorityRecord = op
            .post(
                "/v1/vms",
                &CreateVmRequest {
                    uuid: u,
                    name: "vm".into(),
                    primary: p.into(),
                    backup: Some(bk.into()),
                },
            )
            .await
            .unwrap();
    }
    let seen = |id: &tandem_pki::Identity| {
        let c = h.client(id);
        async move {
            let a: HostAuthority = c.get("/v1/host/authority").await.unwrap();
            let mut v: Vec<_> = a.vms.into_iter().map(|r| r.uuid).collect();
            v.sort();
            v
        }
    };
    assert_eq!(seen(&a.identity).await, vec![u1]);
    let mut both = vec![u1, u2];
    both.sort();
    assert_eq!(seen(&b.identity).await, both);
    assert_eq!(seen(&c.identity).await, vec![u2]);
    // Hosts cannot hand over through the operator API.
    let e = h
        .client(&b.identity)
        .post::<_, AuthorityRecord>(
            &format!("/v1/vms/{u1}/handover"),
            &HandoverRequest {
                expected_generation: 1,
                primary: "host-b".into(),
                backup: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Forbidden));
}

#[tokio::test]
async fn a_connection_opened_before_a_revocation_is_cut_off_at_its_next_request() {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;

    let h = Harness::start().await;
    let joined = h.join("host-a").await;
    let cfg = raw_config(&h.operator, Some(&joined.identity));
    let tcp = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    let tls = tandem_pki::tokio_rustls::TlsConnector::from(cfg)
        .connect(
            tandem_pki::rustls::pki_types::ServerName::try_from("manager").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let heartbeat = || {
        hyper::Request::post("/v1/host/heartbeat")
            .header("host", "manager")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let r = bounded("first request", sender.send_request(heartbeat()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    bounded("body", r.into_body().collect()).await.unwrap();

    let _: RemovedHost = h
        .operator_client()
        .delete("/v1/hosts/host-a")
        .await
        .unwrap();
    // Same connection, same handshake: the next request is refused.
    let r = bounded("second request", sender.send_request(heartbeat()))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body = bounded("body", r.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("revoked"));
}

/// The host-role authority routes over TLS: a host records itself as a
/// VM's primary, never another host's VM; only the recorded backup takes
/// it over, at the generation it had.
#[tokio::test]
async fn hosts_register_their_vms_and_the_backup_records_its_takeover() {
    let h = Harness::start().await;
    let a = h.client(&h.join("host-a").await.identity);
    let b = h.client(&h.join("host-b").await.identity);
    let c = h.client(&h.join("host-c").await.identity);
    let op = h.operator_client();
    let uuid = Uuid::new_v4();
    let reg = |backup: &str| RegisterPrimaryRequest {
        uuid,
        name: "web".into(),
        backup: Some(backup.into()),
    };
    let r: AuthorityRecord = bounded("register", a.post("/v1/host/vms", &reg("host-b")))
        .await
        .unwrap();
    assert_eq!(
        (r.primary.as_str(), r.backup.as_deref(), r.generation),
        ("host-a", Some("host-b"), 1)
    );
    let seen: Vec<AuthorityRecord> = op.get("/v1/vms").await.unwrap();
    assert_eq!(seen, vec![r.clone()]);

    // B cannot take A's VM by registering it: 409 naming A.
    let e = b
        .post::<_, AuthorityRecord>("/v1/host/vms", &reg("host-c"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Conflict), "{e}");
    assert!(e.to_string().contains("host-a"), "{e}");
    // A backup that is not a member: invalid.
    let e = a
        .post::<_, AuthorityRecord>("/v1/host/vms", &reg("host-x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Invalid), "{e}");

    let takeover = format!("/v1/host/vms/{uuid}/takeover");
    let tk = |g| TakeoverRequest {
        expected_generation: g,
    };
    // Only the recorded backup takes over.
    for who in [&c, &a] {
        let e = who
            .post::<_, AuthorityRecord>(&takeover, &tk(1))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{e}");
    }
    // At a stale generation: refused.
    let e = b
        .post::<_, AuthorityRecord>(&takeover, &tk(0))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Conflict), "{e}");
    let t: AuthorityRecord = b.post(&takeover, &tk(1)).await.unwrap();
    assert_eq!(
        (t.primary.as_str(), t.backup.as_deref(), t.generation),
        ("host-b", None, 2)
    );
    let seen: AuthorityRecord = op.get(&format!("/v1/vms/{uuid}")).await.unwrap();
    assert_eq!(seen, t);
    // Not a UUID: invalid.
    let e = b
        .post::<_, AuthorityRecord>("/v1/host/vms/nope/takeover", &tk(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Invalid), "{e}");

    // An operator certificate is refused on the host routes, and a host
    // certificate on the operator's create and handover.
    for (path, body) in [
        ("/v1/host/vms", serde_json::to_value(reg("host-b")).unwrap()),
        (takeover.as_str(), serde_json::to_value(tk(2)).unwrap()),
    ] {
        let e = op
            .post::<_, AuthorityRecord>(path, &body)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{path}: {e}");
    }
    let e = a
        .post::<_, AuthorityRecord>(
            "/v1/vms",
            &CreateVmRequest {
                uuid: Uuid::new_v4(),
                name: "x".into(),
                primary: "host-a".into(),
                backup: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{e}");
}
