//! `tandem cluster vm create|handover|delete`: the operator's corrections
//! of VM authority records, end to end with the real `tandem` binary
//! against a manager served in this process, and their exit codes.

use std::path::Path;

mod common;

use common::{start, tandem};

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_creates_hands_over_and_deletes_vm_records() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("manager");
    let init = tandem(&[
        "cluster".into(),
        "init".into(),
        "--state-dir".into(),
        s(&state),
    ])
    .await;
    assert_eq!(init.code, 0, "{}", init.stderr);

    // Served until the test ends (dropping it stops the manager).
    let served = start(&state).await;
    let addr = served.addr.clone();

    let op = s(&state.join("operator"));
    let run = |args: &[&str]| {
        let mut v: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        v.extend([
            "--identity".into(),
            op.clone(),
            "--manager".into(),
            addr.clone(),
        ]);
        tandem(&v)
    };
    for h in ["host-a", "host-b", "host-c"] {
        let t = run(&["--json", "token", "create"]).await;
        assert_eq!(t.code, 0, "{}", t.stderr);
        let token = t.json()["token"].as_str().unwrap().to_string();
        let j = tandem(&[
            "host".into(),
            "join".into(),
            addr.clone(),
            "--token".into(),
            token,
            "--name".into(),
            h.into(),
            "--state-dir".into(),
            s(&d.path().join(h)),
        ])
        .await;
        assert_eq!(j.code, 0, "{}", j.stderr);
    }

    let uuid = "6f1c8a52-4a4e-4f4e-9d0c-3b1a2c3d4e5f";
    let c = run(&[
        "--json",
        "cluster",
        "vm",
        "create",
        uuid,
        "--name",
        "web",
        "--primary",
        "host-a",
        "--backup",
        "host-b",
    ])
    .await;
    assert_eq!(c.code, 0, "{}", c.stderr);
    let r = c.json();
    assert_eq!(
        (r["primary"].as_str(), r["generation"].as_u64()),
        (Some("host-a"), Some(1))
    );
    // Again: it exists (5). A backup that is no member: invalid (8).
    let again = run(&[
        "cluster",
        "vm",
        "create",
        uuid,
        "--name",
        "web",
        "--primary",
        "host-a",
    ])
    .await;
    assert_eq!(again.code, 5, "{}", again.stderr);
    let bad = run(&[
        "cluster",
        "vm",
        "create",
        "0b9e7d1c-1111-4222-8333-944455556666",
        "--name",
        "db",
        "--primary",
        "host-a",
        "--backup",
        "host-x",
    ])
    .await;
    assert_eq!(bad.code, 8, "{}", bad.stderr);
    assert_eq!(
        run(&[
            "cluster",
            "vm",
            "create",
            "nope",
            "--name",
            "x",
            "--primary",
            "host-a"
        ])
        .await
        .code,
        1
    );

    let h = run(&[
        "cluster",
        "vm",
        "handover",
        uuid,
        "--expected-generation",
        "1",
        "--primary",
        "host-b",
        "--backup",
        "host-c",
    ])
    .await;
    assert_eq!(h.code, 0, "{}", h.stderr);
    assert!(
        h.stdout.contains("handed over: generation 2"),
        "{}",
        h.stdout
    );
    assert!(h.stdout.contains("host-c"), "{}", h.stdout);
    // A handover from the old generation loses (5).
    let stale = run(&[
        "cluster",
        "vm",
        "handover",
        uuid,
        "--expected-generation",
        "1",
        "--primary",
        "host-a",
    ])
    .await;
    assert_eq!(stale.code, 5, "{}", stale.stderr);
    let vms = run(&["--json", "cluster", "vms", uuid]).await.json();
    assert_eq!(vms[0]["primary"], "host-b");
    assert_eq!(vms[0]["generation"], 2);

    assert_eq!(
        run(&["cluster", "vm", "delete", uuid, "--generation", "1"])
            .await
            .code,
        5
    );
    let del = run(&[
        "--json",
        "cluster",
        "vm",
        "delete",
        uuid,
        "--generation",
        "2",
    ])
    .await;
    assert_eq!(del.code, 0, "{}", del.stderr);
    assert_eq!(del.json()["generation"], 2);
    assert_eq!(
        run(&["cluster", "vm", "delete", uuid, "--generation", "2"])
            .await
            .code,
        3
    );
    assert_eq!(
        run(&["--json", "cluster", "vms"]).await.json(),
        serde_json::json!([])
    );
}
