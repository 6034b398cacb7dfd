//! The distributed switch on a live manager over real TLS: validation,
//! revisions and history, a rollout to hosts that cannot take it (no API
//! address, a closed port, a network that swallows everything), and how
//! a host's own report resolves "out of sync". A rollout that commits
//! needs real tandemd hosts: the workspace's end-to-end tests run that.

mod common;

use std::time::Duration;

use common::{bounded, Harness};
use tandem_api::{SwitchTxnStatus, TxnOutcome};
use tandem_dvs::RolloutOutcome;
use tandem_manager::api::{
    Ack, DvsApplyReport, DvsApplyRequest, DvsRevision, DvsRollbackRequest, DvsView, ErrorKind,
    HeartbeatRequest, HeartbeatResponse, HostSwitchSync, HostView,
};
use tandem_manager::client::ClientError;

fn doc(hosts: &[&str], vlan: u16) -> String {
    let mut s = format!("[[port_group]]\nname = \"mgmt\"\nvlan = {vlan}\n");
    for h in hosts {
        s += &format!(
            "\n[[host]]\nname = \"{h}\"\n[[host.host_port]]\nname = \"mgmt\"\ntap = \"tdm-mgmt\"\nport_group = \"mgmt\"\n"
        );
    }
    s
}

fn apply(text: String, timeout_s: Option<u32>, canary: Option<&str>) -> DvsApplyRequest {
    DvsApplyRequest {
        document_toml: text,
        timeout_s,
        canary: canary.map(String::from),
    }
}

fn server_fields(e: &ClientError) -> Vec<String> {
    match e {
        ClientError::Server { fields, .. } => fields.iter().map(|f| f.field.clone()).collect(),
        _ => vec![],
    }
}

/// A port nothing listens on.
async fn closed_port() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap().to_string();
    drop(l);
    a
}

#[tokio::test]
async fn invalid_changes_are_refused_with_field_paths_and_record_nothing() {
    let h = Harness::start().await;
    h.join("host-a").await;
    let op = h.operator_client();
    let e = op
        .post::<_, DvsApplyReport>(
            "/v1/dvs/apply",
            &apply(doc(&["host-a", "host-x"], 10), None, None),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Invalid), "{e}");
    assert_eq!(server_fields(&e), ["host[1].name"], "{e}");
    let e = op
        .post::<_, DvsApplyReport>("/v1/dvs/apply", &apply(doc(&["host-a"], 4095), None, None))
        .await
        .unwrap_err();
    assert_eq!(server_fields(&e), ["port_group[0].vlan"], "{e}");
    for t in [4, 61] {
        let e = op
            .post::<_, DvsApplyReport>("/v1/dvs/apply", &apply(doc(&["host-a"], 10), Some(t), None))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::Invalid), "timeout {t}: {e}");
    }
    let e = op
        .post::<_, DvsApplyReport>(
            "/v1/dvs/apply",
            &apply(doc(&["host-a"], 10), None, Some("host-b")),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Invalid), "{e}");
    let history: Vec<DvsRevision> = op.get("/v1/dvs/history").await.unwrap();
    assert!(history.is_empty(), "{history:?}");
    let view: DvsView = op.get("/v1/dvs").await.unwrap();
    assert_eq!(view.revision, 0);
}

#[tokio::test]
async fn a_canary_that_cannot_take_it_stops_the_rollout_and_revisions_still_grow() {
    let h = Harness::start().await;
    let a = h.join("host-a").await;
    h.join("host-b").await;
    // host-a says where its API is, but nothing listens there; host-b
    // never said.
    let api = closed_port().await;
    let _: HeartbeatResponse = h
        .client(&a.identity)
        .post(
            "/v1/host/heartbeat",
            &HeartbeatRequest {
                host_api: Some(api.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let shown: HostView = h.operator_client().get("/v1/hosts/host-a").await.unwrap();
    assert_eq!(shown.record.host_api.as_deref(), Some(api.as_str()));

    let op = h.operator_client().with_timeout(Duration::from_secs(60));
    let r: DvsApplyReport = bounded(
        "apply",
        op.post(
            "/v1/dvs/apply",
            &apply(doc(&["host-a", "host-b"], 10), Some(5), None),
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.revision, 1);
    assert_eq!(r.outcome, RolloutOutcome::RolledBack);
    assert_eq!(r.current_revision, 0, "the model stays where it was");
    assert_eq!(r.canary.as_deref(), Some("host-a"));
    let ha = &r.hosts[0];
    assert_eq!(
        (ha.host.as_str(), ha.role.as_str(), ha.result.as_str()),
        ("host-a", "canary", "not-applied")
    );
    assert!(
        ha.detail
            .as_deref()
            .unwrap_or("")
            .contains("cannot reach host host-a"),
        "{ha:?}"
    );
    assert_eq!(ha.state, "failed");
    let hb = &r.hosts[1];
    assert_eq!(
        (hb.result.as_str(), hb.revert.as_deref()),
        ("skipped", None)
    );

    // host-b as canary: it never said where its API is.
    let r: DvsApplyReport = bounded(
        "apply",
        op.post(
            "/v1/dvs/apply",
            &apply(doc(&["host-a", "host-b"], 20), Some(5), Some("host-b")),
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.revision, 2, "revisions grow even when a change fails");
    assert_eq!(r.hosts[0].host, "host-b");
    assert!(
        r.hosts[0]
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("--host-api"),
        "{r:?}"
    );

    let history: Vec<DvsRevision> = op.get("/v1/dvs/history").await.unwrap();
    assert_eq!(
        history.iter().map(|r| r.revision).collect::<Vec<_>>(),
        [2, 1]
    );
    assert!(history
        .iter()
        .all(|r| r.outcome == "rolled-back" && r.author == "admin"));
    assert!(
        history[0].document_toml.is_empty(),
        "listings leave documents out"
    );
    let one: DvsRevision = op.get("/v1/dvs/revisions/1").await.unwrap();
    assert!(one.document_toml.contains("vlan = 10"));

    // Rollback applies revision 1's document as revision 3.
    let r: DvsApplyReport = bounded(
        "rollback",
        op.post(
            "/v1/dvs/rollback",
            &DvsRollbackRequest {
                revision: 1,
                timeout_s: Some(5),
                canary: None,
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.revision, 3);
    let three: DvsRevision = op.get("/v1/dvs/revisions/3").await.unwrap();
    assert_eq!(three.rollback_of, Some(1));
    let e = op
        .post::<_, DvsApplyReport>(
            "/v1/dvs/rollback",
            &DvsRollbackRequest {
                revision: 99,
                timeout_s: None,
                canary: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::NotFound), "{e}");

    let view: DvsView = op.get("/v1/dvs").await.unwrap();
    assert_eq!(view.revision, 0);
    assert_eq!(view.hosts.len(), 2);
    assert_eq!(view.hosts[0].host, "host-a");
    assert_eq!(view.hosts[0].state, "failed");
    assert_eq!(view.hosts[0].host_api.as_deref(), Some(api.as_str()));
}

#[tokio::test]
async fn return_lost_is_not_synchronized_until_the_host_says_what_it_runs() {
    let h = Harness::start().await;
    let a = h.join("host-a").await;
    // A network that swallows everything: connections are accepted and
    // never answered, so the transaction's return never comes.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = hole.local_addr().unwrap().to_string();
    let swallow = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let host = h.client(&a.identity);
    let _: HeartbeatResponse = host
        .post(
            "/v1/host/heartbeat",
            &HeartbeatRequest {
                host_api: Some(api),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let op = h.operator_client().with_timeout(Duration::from_secs(60));
    let started = std::time::Instant::now();
    let r: DvsApplyReport = bounded(
        "apply",
        op.post("/v1/dvs/apply", &apply(doc(&["host-a"], 10), Some(5), None)),
    )
    .await
    .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "waited for the return"
    );
    assert_ne!(r.outcome, RolloutOutcome::Completed);
    assert_eq!(r.hosts[0].result, "out-of-sync", "{r:?}");
    let view: DvsView = op.get("/v1/dvs").await.unwrap();
    assert_eq!(view.hosts[0].state, "out-of-sync");
    assert_eq!(view.hosts[0].revision, None);
    let txid = view.hosts[0].last_txid.clone().unwrap();

    // A heartbeat that shows a transaction pending on the host changes
    // nothing; the host's own sync after its rollback resolves it.
    let running = "ab".repeat(32);
    let _: HeartbeatResponse = host
        .post(
            "/v1/host/heartbeat",
            &HeartbeatRequest {
                switch: Some(SwitchTxnStatus {
                    running_digest: running.clone(),
                    pending: Some(tandem_api::PendingTxn {
                        txid: txid.clone(),
                        origin: tandem_api::TxnOrigin::Manager,
                        deadline_in_ms: 100,
                        saved_digest: running.clone(),
                    }),
                    last: None,
                    alarm: None,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let view: DvsView = op.get("/v1/dvs").await.unwrap();
    assert_eq!(view.hosts[0].state, "out-of-sync");
    let _: Ack = host
        .post(
            "/v1/host/switch-sync",
            &HostSwitchSync {
                txid: Some(txid.clone()),
                outcome: TxnOutcome::RolledBack,
                running_digest: running.clone(),
                document_toml: String::new(),
            },
        )
        .await
        .unwrap();
    let view: DvsView = op.get("/v1/dvs").await.unwrap();
    assert_eq!(view.hosts[0].state, "resynced");
    assert_eq!(view.hosts[0].digest.as_deref(), Some(running.as_str()));
    assert!(!view.hosts[0].matches_current);

    // A fallback is a failure to update, with an alarm.
    let _: Ack = host
        .post(
            "/v1/host/switch-sync",
            &HostSwitchSync {
                txid: Some(txid),
                outcome: TxnOutcome::Fallback,
                running_digest: "cd".repeat(32),
                document_toml: String::new(),
            },
        )
        .await
        .unwrap();
    let view: DvsView = op.get("/v1/dvs").await.unwrap();
    assert_eq!(view.hosts[0].state, "failed");
    // A malformed digest is refused.
    let e = host
        .post::<_, Ack>(
            "/v1/host/switch-sync",
            &HostSwitchSync {
                txid: None,
                outcome: TxnOutcome::RolledBack,
                running_digest: "nope".into(),
                document_toml: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Invalid), "{e}");
    swallow.abort();
}

#[tokio::test]
async fn host_switch_states_survive_a_restart() {
    let mut h = Harness::start().await;
    let a = h.join("host-a").await;
    let _: Ack = h
        .client(&a.identity)
        .post(
            "/v1/host/switch-sync",
            &HostSwitchSync {
                txid: None,
                outcome: TxnOutcome::RestoredAtStart,
                running_digest: "ef".repeat(32),
                document_toml: String::new(),
            },
        )
        .await
        .unwrap();
    h.restart().await;
    let view: DvsView = h.operator_client().get("/v1/dvs").await.unwrap();
    assert_eq!(view.hosts.len(), 1);
    assert_eq!(view.hosts[0].state, "resynced");
    assert_eq!(
        view.hosts[0].digest.as_deref(),
        Some("ef".repeat(32).as_str())
    );
}
