//! Cases beyond the seed's figures: placement by free room, shared
//! datastores, a shared NIC, observed times, and input that must be
//! refused rather than trusted.

use tandem_deploy_plan::{
    Action, Datastore, DatastoreCopies, Deployment, Event, HostPlacement, Matrix, PerHost,
    Placement, PlanError, Request, Via,
};

const GIB: u64 = 1 << 30;

fn mesh(targets: &[&str], source_time: f64, peer_time: f64) -> Matrix {
    let mut m = Matrix::new("S", targets.iter().copied()).unwrap();
    for t in targets {
        m.set_time("S", t, source_time).unwrap();
        for u in targets {
            if t != u {
                m.set_time(t, u, peer_time).unwrap();
            }
        }
    }
    m
}

fn request(datastores: Vec<Datastore>, per_host: PerHost) -> Request {
    Request {
        image_bytes: 2 * GIB,
        source_datastore: "S-ds".into(),
        datastores: std::iter::once(Datastore::local("S-ds", "S", 10 * GIB))
            .chain(datastores)
            .collect(),
        per_host,
        local_copy_time: 1.0,
        cross_datastore_time: 2.0,
    }
}

/// `--per-host auto`: copies follow free room, and more copies than the
/// room holds is an error before anything is copied.
#[test]
fn auto_placement_follows_free_room() {
    let m = mesh(&["H1", "H2"], 10.0, 10.0);
    let req = request(
        vec![
            Datastore::local("H1-ds", "H1", 6 * GIB),
            Datastore::local("H2-ds", "H2", 18 * GIB),
        ],
        PerHost::Auto { total: 12 },
    );
    let d = Deployment::new(m.clone(), req.clone(), 0.0).unwrap();
    assert_eq!(d.placement.host("H1").unwrap().copies(), 3);
    assert_eq!(d.placement.host("H2").unwrap().copies(), 9);
    assert_eq!(d.placement.total(), 12);

    let too_many = Request {
        per_host: PerHost::Auto { total: 13 },
        ..req
    };
    assert_eq!(
        Deployment::new(m, too_many, 0.0),
        Err(PlanError::NotEnoughRoom {
            placed: 12,
            requested: 13
        })
    );
}

/// Two hosts mounting one datastore: one network copy serves both.
#[test]
fn shared_datastore_takes_one_network_copy() {
    let m = mesh(&["H1", "H2"], 10.0, 10.0);
    let req = request(
        vec![Datastore::shared("nfs", ["H1", "H2"], 100 * GIB)],
        PerHost::Count(2),
    );
    let d = Deployment::new(m, req, 0.0).unwrap();
    let plan = d.plan().unwrap();
    assert_eq!(plan.network_copies().count(), 1, "{plan}");
    assert_eq!(
        plan.ready.iter().find(|r| r.host == "H2").map(|r| &r.via),
        Some(&Via::Shared {
            datastore: "nfs".into()
        })
    );
    // Four copies on the datastore: the network one and three local.
    let locals = plan
        .steps
        .iter()
        .filter(|s| matches!(s.action, Action::LocalCopy { .. }))
        .count();
    assert_eq!(locals, 3, "{plan}");
}

/// One NIC on the source: its copies go one after the other, so the first
/// target becomes a source sooner and feeds the others.
#[test]
fn egress_limit_serialises_a_hosts_sends() {
    // Direct links 10; between targets 12 (slower than the source's link,
    // but the source can only send one at a time).
    let mut m = mesh(&["H1", "H2", "H3"], 10.0, 12.0);
    let ds = |h: &str| Datastore::local(format!("{h}-ds"), h, 100 * GIB);
    let req = request(vec![ds("H1"), ds("H2"), ds("H3")], PerHost::Count(1));

    // Independent links: all three from the source, done at 10.
    let free = Deployment::new(m.clone(), req.clone(), 0.0).unwrap();
    assert_eq!(free.plan().unwrap().makespan, 10.0);

    m.set_egress_slots("S", Some(1)).unwrap();
    let one = Deployment::new(m, req, 0.0).unwrap();
    let plan = one.plan().unwrap();
    let mut net: Vec<(String, String, f64, f64)> = plan
        .network_copies()
        .map(|(f, t, s)| (f.to_string(), t.to_string(), s.start, s.finish))
        .collect();
    net.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.1.cmp(&b.1)));
    // S→H1 0–10; then S→H2 10–20 and H1→H3 10–22.
    assert_eq!(
        net,
        vec![
            ("S".into(), "H1".into(), 0.0, 10.0),
            ("S".into(), "H2".into(), 10.0, 20.0),
            ("H1".into(), "H3".into(), 10.0, 22.0),
        ],
        "{plan}"
    );
    // Only the first is due now; the second waits for the NIC, not for a
    // copy, and falls due on the clock.
    assert_eq!(plan.due().count(), 1);
    let queued = plan
        .network_copies()
        .find(|(f, t, _)| *f == "S" && *t == "H2")
        .unwrap()
        .2;
    assert_eq!(queued.waits_for, None);
    let mut one = one;
    one.apply(
        0.0,
        &Event::TransferStarted {
            from: "S".into(),
            to: "H1".into(),
            datastore: "H1-ds".into(),
        },
    )
    .unwrap();
    // Halfway, the NIC is still busy: nothing new is due.
    let mid = one.apply(5.0, &Event::Tick).unwrap();
    assert_eq!(mid.due().count(), 0, "{mid}");
    let done = one
        .apply(
            10.0,
            &Event::TransferCompleted {
                from: "S".into(),
                to: "H1".into(),
                observed: None,
            },
        )
        .unwrap();
    let mut due: Vec<String> = done.due().map(|s| s.action.to_string()).collect();
    due.sort();
    assert_eq!(
        due,
        [
            "network copy H1:H1-ds -> H3:H3-ds",
            "network copy S:S-ds -> H2:H2-ds"
        ]
    );
}

/// A completed copy's observed time replaces the link's estimate.
#[test]
fn observed_time_updates_the_link() {
    let m = mesh(&["H1"], 10.0, 10.0);
    let req = request(
        vec![Datastore::local("H1-ds", "H1", 100 * GIB)],
        PerHost::Count(1),
    );
    let mut d = Deployment::new(m, req, 0.0).unwrap();
    d.apply(
        0.0,
        &Event::TransferStarted {
            from: "S".into(),
            to: "H1".into(),
            datastore: "H1-ds".into(),
        },
    )
    .unwrap();
    let plan = d
        .apply(
            14.0,
            &Event::TransferCompleted {
                from: "S".into(),
                to: "H1".into(),
                observed: Some(14.0),
            },
        )
        .unwrap();
    assert_eq!(d.matrix.time("S", "H1"), Ok(Some(14.0)));
    assert!(plan.steps.is_empty(), "{plan}");
    assert_eq!(plan.ready_at("H1"), Some(14.0));
}

/// A target dying mid-copy: the copy is cancelled, its partial file is
/// not asked for (the disk is gone with the host), and the host is
/// reported failed rather than dropped.
#[test]
fn target_failure_is_reported() {
    let m = mesh(&["H1", "H2"], 10.0, 10.0);
    let ds = |h: &str| Datastore::local(format!("{h}-ds"), h, 100 * GIB);
    let req = request(vec![ds("H1"), ds("H2")], PerHost::Count(1));
    let mut d = Deployment::new(m, req, 0.0).unwrap();
    for h in ["H1", "H2"] {
        d.apply(
            0.0,
            &Event::TransferStarted {
                from: "S".into(),
                to: h.into(),
                datastore: format!("{h}-ds"),
            },
        )
        .unwrap();
    }
    let plan = d
        .apply(4.0, &Event::HostFailed { host: "H2".into() })
        .unwrap();
    assert_eq!(plan.failed, ["H2"]);
    assert!(plan.unreachable.is_empty());
    let actions: Vec<String> = plan.steps.iter().map(|s| s.action.to_string()).collect();
    // The copy to H1 runs on; the one to H2 is stopped.
    assert_eq!(
        actions,
        ["network copy S:S-ds -> H1:H1-ds", "cancel transfer S -> H2"]
    );
    assert!(plan.steps[0].running);
    assert!(plan.to_string().contains("failed: H2"));
}

/// A placement is input too: one that names no datastore, or one the host
/// does not mount, is refused, not indexed into.
#[test]
fn bad_placements_are_refused() {
    let m = mesh(&["H1"], 10.0, 10.0);
    let req = request(
        vec![Datastore::local("H1-ds", "H1", 100 * GIB)],
        PerHost::Count(1),
    );
    let mut d = Deployment::new(m, req, 0.0).unwrap();
    d.placement = Placement {
        hosts: vec![HostPlacement {
            host: "H1".into(),
            datastores: vec![],
        }],
    };
    assert_eq!(d.plan(), Err(PlanError::NoDatastore("H1".into())));
    d.placement.hosts[0].datastores.push(DatastoreCopies {
        datastore: "S-ds".into(),
        copies: 1,
    });
    assert!(matches!(d.plan(), Err(PlanError::NotAttached { .. })));
    d.placement.hosts[0].datastores[0] = DatastoreCopies {
        datastore: "H1-ds".into(),
        copies: u32::MAX,
    };
    assert!(matches!(d.plan(), Err(PlanError::TooManyCopies { .. })));
}

/// A stored matrix is checked when read back: a negative time or a link
/// into the source does not sneak in through JSON.
#[test]
fn stored_matrices_are_checked() {
    let ok = r#"{"hosts":[{"name":"S"},{"name":"H1"}],"links":[{"from":"S","to":"H1","time":10}]}"#;
    let m: Matrix = serde_json::from_str(ok).unwrap();
    assert_eq!(m.time("S", "H1"), Ok(Some(10.0)));
    let negative = ok.replace("10", "-1");
    assert!(serde_json::from_str::<Matrix>(&negative).is_err());
    let into_source =
        r#"{"hosts":[{"name":"S"},{"name":"H1"}],"links":[{"from":"H1","to":"S","time":1}]}"#;
    assert!(serde_json::from_str::<Matrix>(into_source).is_err());
    let no_slots = r#"{"hosts":[{"name":"S","egress_slots":0},{"name":"H1"}],"links":[]}"#;
    assert!(serde_json::from_str::<Matrix>(no_slots).is_err());
    // Round trip.
    let back: Matrix = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(back, m);
}

/// Events about transfers that do not exist, or twice over one link, are
/// refused and change nothing.
#[test]
fn inconsistent_events_are_refused() {
    let m = mesh(&["H1", "H2"], 10.0, 10.0);
    let ds = |h: &str| Datastore::local(format!("{h}-ds"), h, 100 * GIB);
    let req = request(vec![ds("H1"), ds("H2")], PerHost::Count(1));
    let mut d = Deployment::new(m, req, 0.0).unwrap();
    let before = d.clone();
    assert!(matches!(
        d.apply(
            1.0,
            &Event::TransferCompleted {
                from: "S".into(),
                to: "H1".into(),
                observed: None
            }
        ),
        Err(PlanError::NoSuchTransfer { .. })
    ));
    let start = Event::TransferStarted {
        from: "S".into(),
        to: "H1".into(),
        datastore: "H1-ds".into(),
    };
    d.apply(1.0, &start).unwrap();
    let started = d.clone();
    assert!(matches!(
        d.apply(1.0, &start),
        Err(PlanError::DuplicateTransfer { .. })
    ));
    assert_eq!(d, started);
    assert!(matches!(
        d.apply(
            1.0,
            &Event::TransferStarted {
                from: "S".into(),
                to: "H2".into(),
                datastore: "nowhere".into(),
            }
        ),
        Err(PlanError::UnknownDatastore(_))
    ));
    assert_eq!(d, started);
    assert_ne!(d, before);
}

/// G3 as it runs for real: S→H1 done early, H1 sends to H2 and H3 at
/// once, H1→H3 started a moment after H1→H2. On paper H3 is then reached
/// a hair sooner through H2 (a tie in the seed's numbers), but the bytes
/// already on their way to H3 are kept; a route that is clearly better
/// (H1→H3 slowed 5×) still cancels it.
#[test]
fn a_transfer_in_flight_is_kept_against_a_tie_and_cancelled_for_a_clear_win() {
    let mut m = Matrix::new("S", ["H1", "H2", "H3"]).unwrap();
    for (f, t, time) in [
        ("S", "H1", 10.0),
        ("S", "H2", 30.0),
        ("S", "H3", 45.0),
        ("H1", "H2", 10.0),
        ("H1", "H3", 15.0),
        ("H2", "H1", 10.0),
        ("H2", "H3", 5.0),
        ("H3", "H1", 15.0),
        ("H3", "H2", 5.0),
    ] {
        m.set_time(f, t, time).unwrap();
    }
    let req = request(
        ["H1", "H2", "H3"]
            .iter()
            .map(|h| Datastore::local(format!("{h}-ds"), *h, 100 * GIB))
            .collect(),
        PerHost::Count(1),
    );
    let mut d = Deployment::new(m, req, 0.0).unwrap();
    let start = |d: &mut Deployment, at: f64, from: &str, to: &str| {
        d.apply(
            at,
            &Event::TransferStarted {
                from: from.into(),
                to: to.into(),
                datastore: format!("{to}-ds"),
            },
        )
        .unwrap()
    };
    start(&mut d, 0.0, "S", "H1");
    d.apply(
        2.26,
        &Event::TransferCompleted {
            from: "S".into(),
            to: "H1".into(),
            observed: Some(2.26),
        },
    )
    .unwrap();
    start(&mut d, 2.27, "H1", "H2");
    let plan = start(&mut d, 2.28, "H1", "H3");
    let cancels = |p: &tandem_deploy_plan::Plan| {
        p.steps
            .iter()
            .filter(|s| matches!(s.action, Action::CancelTransfer { .. }))
            .count()
    };
    assert_eq!(cancels(&plan), 0, "{plan}");
    // H1→H3 turns out five times slower: through H2 is now far better.
    let plan = d
        .apply(
            3.0,
            &Event::LinkTime {
                from: "H1".into(),
                to: "H3".into(),
                time: 75.0,
            },
        )
        .unwrap();
    assert_eq!(cancels(&plan), 1, "{plan}");
}
