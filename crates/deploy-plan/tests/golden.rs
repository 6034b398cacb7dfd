//! D-G1 … D-G10: the seed's worked examples (reference seeds-wave2.md
//! §2.2–§2.3) with its numbers. Times are the seed's minutes. Values the
//! seed does not give are marked ASSUMED where they are set; where the
//! seed contradicts itself (§2.6) the test holds the consistent value and
//! says so.

use tandem_deploy_plan::{
    transfer_time, Action, CopyAt, Datastore, Deployment, Event, Matrix, PerHost, Plan, Request,
    RouteRow, Via,
};

const GIB: u64 = 1 << 30;

fn matrix(links: &[(&str, &str, f64)]) -> Matrix {
    let mut m = Matrix::new("S", ["H1", "H2", "H3"]).unwrap();
    for (f, t, time) in links {
        m.set_time(f, t, *time).unwrap();
    }
    m
}

/// FIG 3A/3B. H2→H1 and H3→H1 are ASSUMED (symmetric, 10 and 15): the
/// seed never gives them, and any value >= 10 changes nothing.
fn g3() -> Matrix {
    matrix(&[
        ("S", "H1", 10.0),
        ("S", "H2", 30.0),
        ("S", "H3", 45.0),
        ("H1", "H2", 10.0),
        ("H1", "H3", 15.0),
        ("H2", "H1", 10.0), // ASSUMED
        ("H2", "H3", 5.0),
        ("H3", "H1", 15.0), // ASSUMED
        ("H3", "H2", 5.0),
    ])
}

/// FIG 11/12. H1→H3 is 25 here, 15 in FIG 3A (§2.6 #7): FIG 11 is
/// another network, not a change to FIG 3A's, so the two matrices stay
/// apart. S→H2, S→H3, H3→H2 and H3→H1 are ASSUMED (45, 45, 5, 25),
/// chosen so that every statement of the seed holds (S→H2 = 30 as in
/// FIG 3A would make the direct link win after the failure, against
/// FIG 13B).
fn g11() -> Matrix {
    matrix(&[
        ("S", "H1", 10.0),
        ("S", "H2", 45.0), // ASSUMED
        ("S", "H3", 45.0), // ASSUMED
        ("H1", "H2", 10.0),
        ("H1", "H3", 25.0),
        ("H2", "H1", 10.0),
        ("H2", "H3", 5.0),
        ("H3", "H1", 25.0), // ASSUMED
        ("H3", "H2", 5.0),  // ASSUMED
    ])
}

/// FIG 10's network; the seed gives no numbers, all ASSUMED: the direct
/// links win (15 < 10 + 10) and H1 finishes first.
fn g10() -> Matrix {
    let mut links = vec![("S", "H1", 10.0), ("S", "H2", 15.0), ("S", "H3", 15.0)];
    for a in ["H1", "H2", "H3"] {
        for b in ["H1", "H2", "H3"] {
            if a != b {
                links.push((a, b, 10.0));
            }
        }
    }
    matrix(&links)
}

/// One roomy local datastore per host and `per_host` copies on each
/// target. Local and cross-datastore copy times are ASSUMED (1 and 2
/// minutes): the seed gives none.
fn request(hosts: &[&str], per_host: u32) -> Request {
    Request {
        image_bytes: 2 * GIB,
        source_datastore: "S-ds".into(),
        datastores: std::iter::once(Datastore::local("S-ds", "S", 100 * GIB))
            .chain(
                hosts
                    .iter()
                    .map(|h| Datastore::local(format!("{h}-ds"), *h, 100 * GIB)),
            )
            .collect(),
        per_host: PerHost::Count(per_host),
        local_copy_time: 1.0,
        cross_datastore_time: 2.0,
    }
}

/// One FIG 3B row as the test writes it: link, time, preferred,
/// precondition.
type Row = (String, String, f64, bool, Option<String>);

fn row(from: &str, to: &str, time: f64, preferred: bool, pre: Option<&str>) -> Row {
    (from.into(), to.into(), time, preferred, pre.map(Into::into))
}

fn rows(r: &[RouteRow]) -> Vec<(usize, Row)> {
    r.iter()
        .map(|r| {
            (
                r.row,
                (
                    r.from.clone(),
                    r.to.clone(),
                    r.time,
                    r.preferred,
                    r.precondition.clone(),
                ),
            )
        })
        .collect()
}

/// (from, to, start, finish, running) of every network copy.
fn net(plan: &Plan) -> Vec<(String, String, f64, f64, bool)> {
    let mut v: Vec<_> = plan
        .network_copies()
        .map(|(f, t, s)| (f.to_string(), t.to_string(), s.start, s.finish, s.running))
        .collect();
    v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    v
}

fn count(plan: &Plan, pred: impl Fn(&Action) -> bool) -> usize {
    plan.steps.iter().filter(|s| pred(&s.action)).count()
}

fn locals_on(plan: &Plan, h: &str) -> Vec<(f64, f64)> {
    plan.steps
        .iter()
        .filter(|s| matches!(&s.action, Action::LocalCopy { host, .. } if host == h))
        .map(|s| (s.start, s.finish))
        .collect()
}

fn deletes(plan: &Plan) -> Vec<String> {
    let mut v: Vec<String> = plan
        .steps
        .iter()
        .filter_map(|s| match &s.action {
            Action::DeletePartial { host, .. } => Some(host.clone()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn cancels(plan: &Plan) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = plan
        .steps
        .iter()
        .filter_map(|s| match &s.action {
            Action::CancelTransfer { from, to } => Some((from.clone(), to.clone())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn started(from: &str, to: &str) -> Event {
    Event::TransferStarted {
        from: from.into(),
        to: to.into(),
        datastore: format!("{to}-ds"),
    }
}

fn fraction(from: &str, to: &str, done_fraction: f64) -> Event {
    Event::TransferProgress {
        from: from.into(),
        to: to.into(),
        done_fraction,
    }
}

fn completed(from: &str, to: &str) -> Event {
    Event::TransferCompleted {
        from: from.into(),
        to: to.into(),
        observed: None,
    }
}

fn local_started(host: &str) -> Event {
    Event::LocalCopyStarted {
        host: host.into(),
        datastore: format!("{host}-ds"),
    }
}

/// D-G1: the G3 matrix gives distances 10 / 20 / 25, the Preferred and
/// Precondition columns of FIG 3B (rows 5 and 7 both Yes: a tie), and
/// 9 preferred paths for 3 hosts.
#[test]
fn d_g1_fig3_matrix_columns_and_distances() {
    let routes = g3().routes();
    assert_eq!(routes.distance("H1"), Some(10.0));
    // 20, not the 15 the seed once writes for S→H1→H2 in FIG 5 (§2.6 #2):
    // 10 + 10 = 20, as FIG 3B and the next sentence of FIG 5 say.
    assert_eq!(routes.distance("H2"), Some(20.0));
    assert_eq!(routes.distance("H3"), Some(25.0));
    // The seed's text names row 2 "S → 150₁, 30 minutes" (§2.6 #1): it is
    // S→H2; row 1 is S→H1 = 10.
    assert_eq!(
        rows(&routes.rows),
        vec![
            (1, row("S", "H1", 10.0, true, None)),
            (2, row("S", "H2", 30.0, false, None)),
            (3, row("S", "H3", 45.0, false, None)),
            (4, row("H1", "H2", 10.0, true, Some("H1"))),
            (5, row("H1", "H3", 15.0, true, Some("H1"))),
            (6, row("H2", "H1", 10.0, false, None)),
            (7, row("H2", "H3", 5.0, true, Some("H2"))),
            (8, row("H3", "H1", 15.0, false, None)),
            (9, row("H3", "H2", 5.0, false, None)),
        ]
    );
    // The chosen path to H3 on the tie is the direct H1→H3 (FIG 5B).
    assert_eq!(routes.path("H3").unwrap().hops, ["S", "H1", "H3"]);
    assert_eq!(routes.path("H2").unwrap().hops, ["S", "H1", "H2"]);
    // "nine separate preferred paths": 3 from the source + 3 × 2.
    let pairs = g3().all_pairs();
    assert_eq!(pairs.len(), 9);
    assert!(pairs.iter().all(|p| p.time.is_some()));
    // The table renders (the CLI shows it before running).
    let shown = g3().to_string();
    assert!(shown.contains("H1 -> H3"), "{shown}");
    assert!(shown.contains("copy complete on H2"), "{shown}");
}

/// D-G2: step 210's example: H1→H2 = 2, H2→H3 = 5, H1→H3 = 10, so the
/// preferred path H1→H3 is through H2, 7 minutes.
#[test]
fn d_g2_preferred_path_between_targets() {
    let m = matrix(&[
        // The source's links are not part of the example: ASSUMED 10 each.
        ("S", "H1", 10.0),
        ("S", "H2", 10.0),
        ("S", "H3", 10.0),
        ("H1", "H2", 2.0),
        ("H2", "H3", 5.0),
        ("H1", "H3", 10.0),
    ]);
    let p = m
        .all_pairs()
        .into_iter()
        .find(|p| p.from == "H1" && p.to == "H3")
        .unwrap();
    assert_eq!(p.time, Some(7.0));
    assert_eq!(p.hops, ["H1", "H2", "H3"]);
}

/// D-G3: event 610 (S→H3: 45 → 10) turns FIG 7A into FIG 7B: row 3
/// 10/Yes, row 7 No with its precondition reset, row 9 Yes with "copy on
/// H3"; distances H2 20 → 15, H3 25 → 10.
#[test]
fn d_g3_fig7_change_event() {
    let mut m = g3();
    let before = m.routes();
    let r = |t: &tandem_deploy_plan::RouteTable, f: &str, to: &str| {
        let r = t.row(f, to).unwrap();
        (r.row, r.time, r.preferred, r.precondition.clone())
    };
    assert_eq!(r(&before, "S", "H3"), (3, 45.0, false, None));
    assert_eq!(r(&before, "H2", "H3"), (7, 5.0, true, Some("H2".into())));
    assert_eq!(r(&before, "H3", "H2"), (9, 5.0, false, None));

    m.set_time("S", "H3", 10.0).unwrap();
    let after = m.routes();
    assert_eq!(r(&after, "S", "H3"), (3, 10.0, true, None));
    assert_eq!(r(&after, "H2", "H3"), (7, 5.0, false, None));
    assert_eq!(r(&after, "H3", "H2"), (9, 5.0, true, Some("H3".into())));
    // The seed mentions only rows 3, 7 and 9 (§2.6 #6), but under its own
    // definition row 4 (H1→H2) is on no shortest path any more.
    assert_eq!(r(&after, "H1", "H2"), (4, 10.0, false, None));
    assert_eq!(r(&after, "H1", "H3"), (5, 15.0, false, None));
    assert_eq!(after.distance("H1"), Some(10.0));
    assert_eq!(after.distance("H2"), Some(15.0));
    assert_eq!(after.distance("H3"), Some(10.0));
    assert_eq!(after.path("H2").unwrap().hops, ["S", "H3", "H2"]);
}

/// D-G4: G11 before (12A) and after (12B) the H1–H2 cable fails.
#[test]
fn d_g4_fig12_link_failure_matrix() {
    let mut m = g11();
    let a = m.routes();
    assert_eq!(
        (a.distance("H1"), a.distance("H2"), a.distance("H3")),
        (Some(10.0), Some(20.0), Some(25.0))
    );
    let preferred = |t: &tandem_deploy_plan::RouteTable| -> Vec<(usize, Option<String>)> {
        t.rows
            .iter()
            .filter(|r| r.preferred)
            .map(|r| (r.row, r.precondition.clone()))
            .collect()
    };
    assert_eq!(
        preferred(&a),
        vec![(1, None), (4, Some("H1".into())), (7, Some("H2".into()))]
    );

    let mut progress = tandem_deploy_plan::Progress::at(0.0);
    tandem_deploy_plan::apply_event(
        &mut m,
        &mut progress,
        15.0,
        &Event::LinkFailed {
            a: "H1".into(),
            b: "H2".into(),
        },
    )
    .unwrap();
    let b = m.routes();
    // Rows 4 and 6 are gone; the others keep their numbers.
    let numbers: Vec<usize> = b.rows.iter().map(|r| r.row).collect();
    assert_eq!(numbers, [1, 2, 3, 5, 7, 8, 9]);
    assert_eq!(
        (b.distance("H1"), b.distance("H3"), b.distance("H2")),
        (Some(10.0), Some(35.0), Some(40.0))
    );
    assert_eq!(
        preferred(&b),
        vec![(1, None), (5, Some("H1".into())), (9, Some("H3".into()))]
    );
    assert_eq!(b.path("H2").unwrap().hops, ["S", "H1", "H3", "H2"]);
}

/// D-G5: FIG 5, G3 with 3 copies per host: network copies S→H1, H1→H2,
/// H1→H3 only (arriving at 10, 20, 25), 6 local copies, 3/3/3.
#[test]
fn d_g5_fig5_schedule() {
    let d = Deployment::new(g3(), request(&["H1", "H2", "H3"], 3), 0.0).unwrap();
    let plan = d.plan().unwrap();
    assert_eq!(
        net(&plan),
        vec![
            ("H1".into(), "H2".into(), 10.0, 20.0, false),
            ("H1".into(), "H3".into(), 10.0, 25.0, false),
            ("S".into(), "H1".into(), 0.0, 10.0, false),
        ]
    );
    assert_eq!(count(&plan, |a| matches!(a, Action::LocalCopy { .. })), 6);
    assert_eq!(
        count(&plan, |a| matches!(a, Action::CrossDatastoreCopy { .. })),
        0
    );
    // Local copies start when the host's first copy is complete (local
    // copy time 1 is ASSUMED).
    assert_eq!(locals_on(&plan, "H1"), [(10.0, 11.0), (10.0, 11.0)]);
    assert_eq!(locals_on(&plan, "H2"), [(20.0, 21.0), (20.0, 21.0)]);
    assert_eq!(locals_on(&plan, "H3"), [(25.0, 26.0), (25.0, 26.0)]);
    for h in ["H1", "H2", "H3"] {
        assert_eq!(d.placement.host(h).unwrap().copies(), 3);
    }
    assert_eq!(plan.makespan, 26.0);
    assert_eq!(plan.ready_at("H3"), Some(25.0));
    // Only the first copy can start at once.
    let due: Vec<String> = plan.due().map(|s| s.action.to_string()).collect();
    assert_eq!(due, ["network copy S:S-ds -> H1:H1-ds"]);
}

/// D-G6: FIG 4, one target with two datastores, 6 copies: 3 + 3, one
/// network copy, one cross-datastore copy, four same-datastore copies,
/// the second datastore's copies made from the copy on it.
#[test]
fn d_g6_fig4_two_datastores() {
    let mut m = Matrix::new("S", ["H"]).unwrap();
    m.set_time("S", "H", 10.0).unwrap(); // ASSUMED: FIG 4 has no time.
    let req = Request {
        image_bytes: 2 * GIB,
        source_datastore: "S-ds".into(),
        datastores: vec![
            Datastore::local("S-ds", "S", 10 * GIB),
            Datastore::local("ds1", "H", 50 * GIB),
            Datastore::local("ds2", "H", 50 * GIB),
        ],
        per_host: PerHost::Count(6),
        local_copy_time: 1.0,      // ASSUMED
        cross_datastore_time: 2.0, // ASSUMED
    };
    let d = Deployment::new(m, req, 0.0).unwrap();
    let hp = d.placement.host("H").unwrap();
    assert_eq!((hp.on("ds1"), hp.on("ds2")), (3, 3));
    let plan = d.plan().unwrap();
    assert_eq!(net(&plan), vec![("S".into(), "H".into(), 0.0, 10.0, false)]);
    let steps: Vec<(String, f64, f64)> = plan
        .steps
        .iter()
        .map(|s| (s.action.to_string(), s.start, s.finish))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("network copy S:S-ds -> H:ds1".to_string(), 0.0, 10.0),
            (
                "cross-datastore copy on H: ds1 -> ds2".to_string(),
                10.0,
                12.0
            ),
            ("local copy on H:ds1".to_string(), 10.0, 11.0),
            ("local copy on H:ds1".to_string(), 10.0, 11.0),
            ("local copy on H:ds2".to_string(), 12.0, 13.0),
            ("local copy on H:ds2".to_string(), 12.0, 13.0),
        ]
    );
}

/// D-G7: FIG 8, G3 with event 610 (S→H3 → 10) at t = 2 while S→H1 runs:
/// S→H1 goes on, S→H3 starts, H2 is fed from H3; network copies
/// {S→H1, S→H3, H3→H2}. The event comes at t = 2 (< 5) so that the
/// time-aware plan and the seed's static one agree (§2.3). The seed's
/// text once calls the path to H1 "a direct link from S to 150₃" (§2.6
/// #3): it is S→H1, the copy already running, which goes on.
///
/// The time-aware plan counts a transfer's remaining time from its last
/// progress report (or its start), not from the moment of re-planning: at
/// t = 6 the S→H1 copy that began at 0 still ends at 10, so H1→H2 (done at
/// 20) beats S→H3→H2 (done at 6 + 10 + 5 = 21), as §2.3 computes.
#[test]
fn d_g7_fig8_change_during_deployment() {
    let mut d = Deployment::new(g3(), request(&["H1", "H2", "H3"], 3), 0.0).unwrap();
    d.apply(0.0, &started("S", "H1")).unwrap();
    d.apply(2.0, &fraction("S", "H1", 0.2)).unwrap();
    let plan = d
        .apply(
            2.0,
            &Event::LinkTime {
                from: "S".into(),
                to: "H3".into(),
                time: 10.0,
            },
        )
        .unwrap();
    assert_eq!(
        net(&plan),
        vec![
            ("H3".into(), "H2".into(), 12.0, 17.0, false),
            ("S".into(), "H1".into(), 0.0, 10.0, true),
            ("S".into(), "H3".into(), 2.0, 12.0, false),
        ]
    );
    assert!(cancels(&plan).is_empty(), "S→H1 is not cancelled");
    assert!(deletes(&plan).is_empty());
    assert_eq!(count(&plan, |a| matches!(a, Action::LocalCopy { .. })), 6);
    assert_eq!(locals_on(&plan, "H3"), [(12.0, 13.0), (12.0, 13.0)]);
    assert_eq!(plan.routes.distance("H2"), Some(15.0));
    // S→H3 starts now; H3 sends to H2 only once its copy is complete.
    let due: Vec<String> = plan.due().map(|s| s.action.to_string()).collect();
    assert_eq!(due, ["network copy S:S-ds -> H3:H3-ds"]);
    let h3_h2 = plan
        .network_copies()
        .find(|(f, _, _)| *f == "H3")
        .unwrap()
        .2;
    assert_eq!(
        h3_h2.waits_for,
        Some(CopyAt {
            host: "H3".into(),
            datastore: "H3-ds".into()
        })
    );

    // Had the event come at t = 6 the seed's static rule would still feed
    // H2 from H3, but H3 could deliver only at 6 + 15 = 21 > 20: the
    // time-aware plan keeps H1→H2.
    let mut late = Deployment::new(g3(), request(&["H1", "H2", "H3"], 3), 0.0).unwrap();
    late.apply(0.0, &started("S", "H1")).unwrap();
    let plan = late
        .apply(
            6.0,
            &Event::LinkTime {
                from: "S".into(),
                to: "H3".into(),
                time: 10.0,
            },
        )
        .unwrap();
    assert_eq!(
        net(&plan),
        vec![
            ("H1".into(), "H2".into(), 10.0, 20.0, false),
            ("S".into(), "H1".into(), 0.0, 10.0, true),
            ("S".into(), "H3".into(), 6.0, 16.0, false),
        ],
        "{plan}"
    );
}

/// D-G8: FIG 10, G10, the source fails at t = 12 after H1's copy is
/// complete: the partial copies on H2 and H3 are deleted and H1 feeds
/// them (12 → 22); failing at t = 5, before any copy is complete, ends
/// the deployment and deletes every partial copy.
///
/// FIG 9's text sends "no alternative route" to step 945, "deploy via the
/// alternative route" (§2.6 #4): held here the way the next paragraph
/// fixes it, an alternative from a host holding a copy is used, and with
/// no copy anywhere the deployment ends. FIG 10C says 460₂ was deployed on
/// H3 (§2.6 #5): it is 460₃, H3's own copy, which came from H1.
#[test]
fn d_g8_fig10_source_fails() {
    let start = || {
        let mut d = Deployment::new(g10(), request(&["H1", "H2", "H3"], 3), 0.0).unwrap();
        let first = d.plan().unwrap();
        assert_eq!(
            net(&first),
            vec![
                ("S".into(), "H1".into(), 0.0, 10.0, false),
                ("S".into(), "H2".into(), 0.0, 15.0, false),
                ("S".into(), "H3".into(), 0.0, 15.0, false),
            ]
        );
        for h in ["H1", "H2", "H3"] {
            d.apply(0.0, &started("S", h)).unwrap();
        }
        d
    };

    let mut d = start();
    d.apply(10.0, &completed("S", "H1")).unwrap();
    d.apply(10.0, &local_started("H1")).unwrap();
    d.apply(10.0, &local_started("H1")).unwrap();
    d.apply(12.0, &fraction("S", "H2", 0.8)).unwrap();
    d.apply(12.0, &fraction("S", "H3", 0.8)).unwrap();
    let plan = d
        .apply(12.0, &Event::HostFailed { host: "S".into() })
        .unwrap();
    assert_eq!(plan.abort, None);
    assert_eq!(
        cancels(&plan),
        [("S".into(), "H2".into()), ("S".into(), "H3".into())]
    );
    assert_eq!(deletes(&plan), ["H2", "H3"]);
    assert_eq!(
        net(&plan),
        vec![
            ("H1".into(), "H2".into(), 12.0, 22.0, false),
            ("H1".into(), "H3".into(), 12.0, 22.0, false),
        ]
    );
    // H1's two local copies are under way already; H2 and H3 make two each.
    assert!(locals_on(&plan, "H1").is_empty());
    assert_eq!(locals_on(&plan, "H2"), [(22.0, 23.0), (22.0, 23.0)]);
    assert_eq!(locals_on(&plan, "H3"), [(22.0, 23.0), (22.0, 23.0)]);
    // With S gone, paths are rooted at the host holding a copy.
    assert_eq!(plan.routes.roots, ["H1"]);
    for h in ["H2", "H3"] {
        assert_eq!(
            plan.ready.iter().find(|r| r.host == h).map(|r| &r.via),
            Some(&Via::Network { from: "H1".into() })
        );
    }

    let mut d = start();
    let plan = d
        .apply(5.0, &Event::HostFailed { host: "S".into() })
        .unwrap();
    assert!(plan.abort.is_some());
    assert!(matches!(plan.steps[0].action, Action::Abort { .. }));
    assert_eq!(deletes(&plan), ["H1", "H2", "H3"]);
    assert_eq!(net(&plan), vec![]);
    assert_eq!(count(&plan, |a| matches!(a, Action::LocalCopy { .. })), 0);
}

/// D-G9: FIG 13, G11, the H1–H2 cable fails at t_f = 15 while H1→H2
/// runs: the partial copy on H2 is deleted, H1→H3 (done t_f + 25 = 40)
/// then H3→H2 (done t_f + 30 = 45).
#[test]
fn d_g9_fig13_link_fails_in_flight() {
    let mut d = Deployment::new(g11(), request(&["H1", "H2", "H3"], 3), 0.0).unwrap();
    let first = d.plan().unwrap();
    assert_eq!(
        net(&first),
        vec![
            ("H1".into(), "H2".into(), 10.0, 20.0, false),
            ("H2".into(), "H3".into(), 20.0, 25.0, false),
            ("S".into(), "H1".into(), 0.0, 10.0, false),
        ]
    );
    d.apply(0.0, &started("S", "H1")).unwrap();
    d.apply(10.0, &completed("S", "H1")).unwrap();
    d.apply(10.0, &started("H1", "H2")).unwrap();
    d.apply(15.0, &fraction("H1", "H2", 0.5)).unwrap();
    let plan = d
        .apply(
            15.0,
            &Event::LinkFailed {
                a: "H1".into(),
                b: "H2".into(),
            },
        )
        .unwrap();
    assert_eq!(cancels(&plan), [("H1".into(), "H2".into())]);
    assert_eq!(deletes(&plan), ["H2"]);
    assert_eq!(
        net(&plan),
        vec![
            ("H1".into(), "H3".into(), 15.0, 40.0, false),
            ("H3".into(), "H2".into(), 40.0, 45.0, false),
        ]
    );
    assert_eq!(
        plan.ready.iter().find(|r| r.host == "H2").map(|r| &r.via),
        Some(&Via::Network { from: "H3".into() })
    );
    // The executor deletes the partial and reports it; it is not asked again.
    d.apply(
        15.0,
        &Event::TransferFailed {
            from: "H1".into(),
            to: "H2".into(),
        },
    )
    .unwrap();
    d.apply(
        15.0,
        &Event::PartialDeleted {
            host: "H2".into(),
            datastore: "H2-ds".into(),
        },
    )
    .unwrap();
    let plan = d.plan().unwrap();
    assert!(deletes(&plan).is_empty() && cancels(&plan).is_empty());
}

/// D-G10: the time model: 50 GB at 20 MB/s is 2500 s (the seed rounds it
/// to "about 40 minutes"; it is 41.7).
#[test]
fn d_g10_time_model() {
    assert_eq!(transfer_time(50_000_000_000, 20_000_000.0), Ok(2500.0));
    let mut m = Matrix::new("S", ["H1"]).unwrap();
    m.set_rate("S", "H1", 50_000_000_000, 20_000_000.0).unwrap();
    assert_eq!(m.time("S", "H1"), Ok(Some(2500.0)));
}
