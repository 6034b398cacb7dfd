//! The host agent against a real manager over TLS: heartbeat, inventory,
//! the revocation list and the authority cache, renewal, and life with the
//! manager down.

mod common;

use std::time::Duration;

use common::Harness;
use tandem_manager::agent::{
    renew_at, save_joined, AgentConfig, AgentError, CachedAuthority, HostAgent, Reporter,
    AUTHORITY_FILE, CRL_FILE, REVOCATIONS_FILE,
};
use tandem_manager::api::{
    AuthorityRecord, CreateVmRequest, Datastore, DatastoreKind, Health, HealthState, HostView,
    Inventory, PortGroupInfo, QemuInfo, RemovedHost,
};
use tandem_manager::client::ClientError;
use tandem_pki::{Identity, RevocationList, Revocations as _};
use uuid::Uuid;

struct Fixed(Inventory);

impl Reporter for Fixed {
    fn health(&self) -> Health {
        Health {
            state: HealthState::Ok,
            problems: vec![],
        }
    }
    fn inventory(&self) -> Inventory {
        self.0.clone()
    }
}

fn inventory(datastore: &str, group: &str) -> Inventory {
    Inventory {
        datastores: vec![Datastore {
            path: datastore.into(),
            total_bytes: 100 << 30,
            free_bytes: 40 << 30,
            kind: DatastoreKind::Local,
        }],
        qemu: QemuInfo {
            version: "10.0.2".into(),
            machine_types: vec!["pc-q35-10.0".into()],
        },
        port_groups: vec![PortGroupInfo {
            name: group.into(),
            vlan: Some(10),
            trunk: vec![],
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn the_agent_reports_caches_and_renews_and_survives_the_manager_going_away() {
    let mut h = Harness::start().await;
    let dir = h.path("host-a/identity");
    let joined = h.join("host-a").await;
    save_joined(&dir, &joined).unwrap();
    let b = h.join("host-b").await;

    let (mut agent, handle) = HostAgent::open(AgentConfig::new(&dir)).unwrap();
    let reporter = Fixed(inventory("/var/lib/tandem", "vm-net"));
    agent.tick(&reporter).await.unwrap();

    // The manager has the inventory and the health.
    let op = h.operator_client();
    let seen: HostView = op.get("/v1/hosts/host-a").await.unwrap();
    assert_eq!(seen.record.inventory.as_ref(), Some(&reporter.0));
    assert_eq!(seen.record.health.state, HealthState::Ok);

    // A VM naming host-a: the next tick caches it, on disk too, in the
    // shape the replication crate's RecordedPrimaries reads.
    let uuid = Uuid::new_v4();
    let _: AuthorityRecord = op
        .post(
            "/v1/vms",
            &CreateVmRequest {
                uuid,
                name: "web".into(),
                primary: "host-b".into(),
                backup: Some("host-a".into()),
            },
        )
        .await
        .unwrap();
    agent.tick(&reporter).await.unwrap();
    assert_eq!(handle.authority.borrow().vms.len(), 1);
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(AUTHORITY_FILE)).unwrap()).unwrap();
    assert_eq!(file["this_host"], "host-a");
    let vm = &file["vms"][uuid.hyphenated().to_string()];
    assert_eq!(vm["primary"], "host-b");
    assert_eq!(vm["backup"], "host-a");
    assert_eq!(vm["generation"], 1);
    assert_eq!(vm["name"], "web");

    // A revocation reaches the host's list (and its file) on the next tick.
    let removed: RemovedHost = op.delete("/v1/hosts/host-b").await.unwrap();
    agent.tick(&reporter).await.unwrap();
    assert!(handle.revocations.is_revoked(b.identity.serial()));
    assert_eq!(
        handle.revocations.generation(),
        removed.revocation_generation
    );
    let on_disk = RevocationList::open(&dir.join(REVOCATIONS_FILE)).unwrap();
    assert!(on_disk.is_revoked(b.identity.serial()));
    // And the CRL for QEMU, signed by the cluster CA.
    let crl = std::fs::read_to_string(dir.join(CRL_FILE)).unwrap();
    handle
        .identity
        .borrow()
        .qemu_crl(&h.path("qemu-tls"), &crl)
        .unwrap();

    // Renewal: a new certificate, saved, published, and used from then on.
    let before = handle.identity.borrow().serial().to_string();
    let mut watch = handle.identity.clone();
    agent.renew().await.unwrap();
    assert!(watch.has_changed().unwrap());
    let after = watch.borrow_and_update().serial().to_string();
    assert_ne!(before, after);
    assert_eq!(Identity::load(&dir).unwrap().serial(), after);
    agent.tick(&reporter).await.unwrap();
    let seen: HostView = op.get("/v1/hosts/host-a").await.unwrap();
    assert_eq!(seen.record.cert.serial, after);
    assert_eq!(seen.record.previous_certs[0].serial, before);

    // The manager goes away: ticks fail, nothing cached is lost, and a
    // restarted agent (a restarted tandemd) loads it all from disk.
    h.stop().await;
    let err = agent.tick(&reporter).await.unwrap_err();
    assert!(
        matches!(err, AgentError::Client(ClientError::Connect { .. })),
        "{err:?}"
    );
    assert_eq!(handle.authority.borrow().vms.len(), 1);
    drop(agent);
    let (_again, handle2) = HostAgent::open(AgentConfig::new(&dir)).unwrap();
    assert_eq!(handle2.authority.borrow().vms[0].uuid, uuid);
    assert_eq!(
        handle2.authority.borrow().vms[0].backup.as_deref(),
        Some("host-a")
    );
    assert!(handle2.revocations.is_revoked(b.identity.serial()));
    assert_eq!(handle2.identity.borrow().serial(), after);
    let cached: CachedAuthority =
        serde_json::from_slice(&std::fs::read(dir.join(AUTHORITY_FILE)).unwrap()).unwrap();
    assert_eq!(cached.this_host, "host-a");
}

#[tokio::test]
async fn a_restarted_manager_gets_the_inventory_back_from_the_agents() {
    let mut h = Harness::start().await;
    let mut agents = Vec::new();
    for (name, ds, pg) in [("host-a", "/srv/a", "red"), ("host-b", "/srv/b", "blue")] {
        let dir = h.path(&format!("{name}/identity"));
        save_joined(&dir, &h.join(name).await).unwrap();
        let (agent, _) = HostAgent::open(AgentConfig::new(&dir)).unwrap();
        agents.push((agent, Fixed(inventory(ds, pg))));
    }
    for (a, r) in &mut agents {
        a.tick(r).await.unwrap();
    }
    h.restart().await;
    // The first tick after the restart is told to send the inventory even
    // though its own minute has not passed.
    let op = h.operator_client();
    for (a, r) in &mut agents {
        a.tick(r).await.unwrap();
    }
    let hosts: Vec<HostView> = op.get("/v1/hosts").await.unwrap();
    assert_eq!(hosts.len(), 2);
    for (host, (_, r)) in hosts.iter().zip(&agents) {
        assert_eq!(
            host.record.inventory.as_ref(),
            Some(&r.0),
            "{}",
            host.record.name
        );
        assert_eq!(host.connection, tandem_manager::api::Connection::Online);
    }
    // Each host's own view: different datastores and port groups.
    assert_eq!(
        hosts[0].record.inventory.as_ref().unwrap().datastores[0].path,
        "/srv/a"
    );
    assert_eq!(
        hosts[1].record.inventory.as_ref().unwrap().port_groups[0].name,
        "blue"
    );
}

#[test]
fn renewal_is_due_at_two_thirds_of_the_life() {
    let dir = tempfile::tempdir().unwrap();
    let ca = tandem_pki::ClusterCa::create(&dir.path().join("ca"), "t").unwrap();
    let id = ca
        .identity(
            &ca.issue("h", tandem_pki::Role::Host, Duration::from_secs(24 * 3600))
                .unwrap(),
        )
        .unwrap();
    let at = renew_at(&id);
    let left = id.not_after().duration_since(at).unwrap();
    // A third of 24 h, to the second.
    assert!(
        (left.as_secs() as i64 - 8 * 3600).abs() <= 1,
        "renews {left:?} before expiry"
    );
}

/// tandemd's calls through the handle: registering as primary and
/// recording a takeover update the cache at once (no tick), and
/// `refresh_authority` fetches now, at most once a second.
#[tokio::test]
async fn the_handle_registers_takes_over_and_refreshes_without_a_tick() {
    let h = Harness::start().await;
    let (da, db) = (h.path("host-a/identity"), h.path("host-b/identity"));
    save_joined(&da, &h.join("host-a").await).unwrap();
    save_joined(&db, &h.join("host-b").await).unwrap();
    let (_agent_a, a) = HostAgent::open(AgentConfig::new(&da)).unwrap();
    let (_agent_b, b) = HostAgent::open(AgentConfig::new(&db)).unwrap();
    let uuid = Uuid::new_v4();

    let r = common::bounded("register", a.register_primary(uuid, "web", Some("host-b")))
        .await
        .unwrap();
    assert_eq!((r.primary.as_str(), r.generation), ("host-a", 1));
    assert_eq!(a.cached(uuid), Some(r.clone()));
    let file: CachedAuthority =
        serde_json::from_slice(&std::fs::read(da.join(AUTHORITY_FILE)).unwrap()).unwrap();
    assert_eq!(file.vms[&uuid.hyphenated().to_string()].backup, "host-b");

    // B's cache learns of it when asked to refresh, not before.
    assert_eq!(b.cached(uuid), None);
    let mut changes = b.authority.clone();
    assert!(b.refresh_authority());
    // Within the second: not again.
    assert!(!b.refresh_authority());
    common::bounded("the refresh", changes.changed())
        .await
        .unwrap();
    assert_eq!(b.cached(uuid), Some(r.clone()));

    // Another host's VM is not B's to register.
    let e = b
        .register_primary(uuid, "web", Some("host-a"))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        Some(tandem_manager::api::ErrorKind::Conflict),
        "{e}"
    );

    let t = common::bounded("takeover", b.record_takeover(uuid, 1))
        .await
        .unwrap();
    assert_eq!(
        (t.primary.as_str(), t.backup.as_deref(), t.generation),
        ("host-b", None, 2)
    );
    assert_eq!(b.cached(uuid), Some(t));
    // The old primary's stale claim is refused.
    let e = a.record_takeover(uuid, 1).await.unwrap_err();
    assert_eq!(
        e.kind(),
        Some(tandem_manager::api::ErrorKind::Forbidden),
        "{e}"
    );
}
