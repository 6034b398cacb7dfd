//! The cluster commands end to end: the real `tandem` binary against a
//! manager served in this process over TLS on 127.0.0.1, and the exit
//! codes scripts rely on.

use std::path::{Path, PathBuf};

mod common;

use common::{start, stop, tandem};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_join_list_remove_backup_restore() {
    let d = tempfile::tempdir().unwrap();
    let state: PathBuf = d.path().join("manager");
    let op = state.join("operator");

    let out = tandem(&[
        "--json",
        "cluster",
        "init",
        "--state-dir",
        s(&state),
        "--name",
        "lab",
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json()["cluster_name"], "lab");
    // Twice: refused, nothing overwritten.
    let again = tandem(&["cluster", "init", "--state-dir", s(&state)]).await;
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.contains("refusing to overwrite"),
        "{}",
        again.stderr
    );

    let served = start(&state).await;
    let addr = served.addr.clone();
    let m = ["--identity", s(&op), "--manager", &addr];
    let with = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(m.iter().map(|s| s.to_string()));
        v
    };
    let run = |v: Vec<String>| async move {
        let r: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        tandem(&r).await
    };

    let t = run(with(&["--json", "token", "create"])).await;
    assert_eq!(t.code, 0, "{}", t.stderr);
    let token = t.json()["token"].as_str().unwrap().to_string();

    let host_state = d.path().join("host-a");
    let j = tandem(&[
        "--json",
        "host",
        "join",
        &addr,
        "--token",
        &token,
        "--name",
        "host-a",
        "--state-dir",
        s(&host_state),
    ])
    .await;
    assert_eq!(j.code, 0, "{}", j.stderr);
    assert_eq!(j.json()["name"], "host-a");
    assert!(host_state.join("identity/identity.pem").exists());
    assert!(host_state.join("identity/manager.json").exists());
    // The same token again (another host): refused, exit 4.
    let j2 = tandem(&[
        "host",
        "join",
        &addr,
        "--token",
        &token,
        "--name",
        "host-b",
        "--state-dir",
        s(&d.path().join("host-b")),
    ])
    .await;
    assert_eq!(j2.code, 4, "{}", j2.stderr);
    // A second host with a fresh token, read from a file.
    let t2 = run(with(&["--json", "token", "create", "--host", "host-b"])).await;
    let tf = d.path().join("token");
    std::fs::write(&tf, t2.json()["token"].as_str().unwrap()).unwrap();
    let j3 = tandem(&[
        "host",
        "join",
        &addr,
        "--token-file",
        s(&tf),
        "--name",
        "host-b",
        "--state-dir",
        s(&d.path().join("host-b")),
    ])
    .await;
    assert_eq!(j3.code, 0, "{}", j3.stderr);

    let list = run(with(&["--json", "host", "list"])).await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    let names: Vec<String> = list
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["host-a", "host-b"]);
    let human = run(with(&["host", "list"])).await;
    assert!(human.stdout.contains("host-a") && human.stdout.contains("CONNECTION"));
    let show = run(with(&["host", "show", "host-a"])).await;
    assert_eq!(show.code, 0);
    assert!(show.stdout.contains("certificate:"), "{}", show.stdout);
    assert_eq!(run(with(&["host", "show", "host-z"])).await.code, 3);

    let rm = run(with(&["--json", "host", "remove", "host-a"])).await;
    assert_eq!(rm.code, 0, "{}", rm.stderr);
    assert_eq!(rm.json()["revoked"].as_array().unwrap().len(), 1);
    assert_eq!(run(with(&["host", "remove", "host-a"])).await.code, 3);

    let st = run(with(&["--json", "cluster", "status"])).await;
    assert_eq!(st.code, 0, "{}", st.stderr);
    assert_eq!(st.json()["hosts"], 1);
    assert_eq!(run(with(&["cluster", "status"])).await.code, 0);
    assert_eq!(
        run(with(&["--json", "cluster", "vms"])).await.json(),
        serde_json::json!([])
    );

    // Backup while the manager runs: the records come over its API.
    let backup = d.path().join("backup");
    let no_choice = run(with(&[
        "cluster",
        "backup",
        s(&backup),
        "--state-dir",
        s(&state),
    ]))
    .await;
    assert_eq!(no_choice.code, 1);
    assert!(
        no_choice.stderr.contains("--passphrase-file"),
        "{}",
        no_choice.stderr
    );
    let pass = d.path().join("pass");
    std::fs::write(&pass, "correct horse battery\n").unwrap();
    let b = run(with(&[
        "--json",
        "cluster",
        "backup",
        s(&backup),
        "--state-dir",
        s(&state),
        "--passphrase-file",
        s(&pass),
    ]))
    .await;
    assert_eq!(b.code, 0, "{}", b.stderr);
    assert_eq!(b.json()["encrypted"], true);
    for f in ["ca.backup", "store.json", "cluster.json"] {
        assert!(backup.join(f).exists(), "{f}");
    }
    stop(served).await;

    // Unreachable manager: exit 6.
    let gone = tandem(&["host", "list", "--identity", s(&op), "--manager", &addr]).await;
    assert_eq!(gone.code, 6, "{}", gone.stderr);

    // Restore into a new state directory; the cluster comes back.
    let state2 = d.path().join("manager2");
    let r = tandem(&[
        "--json",
        "cluster",
        "restore",
        s(&backup),
        "--state-dir",
        s(&state2),
        "--passphrase-file",
        s(&pass),
    ])
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let served = start(&state2).await;
    let op2 = state2.join("operator");
    let list = tandem(&[
        "--json",
        "host",
        "list",
        "--identity",
        s(&op2),
        "--manager",
        &served.addr,
    ])
    .await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    let hosts = list.json();
    assert_eq!(hosts.as_array().unwrap().len(), 1);
    assert_eq!(hosts[0]["name"], "host-b");
    stop(served).await;

    // Usage errors are 2.
    assert_eq!(tandem(&["host", "show"]).await.code, 2);
}

#[tokio::test]
async fn standalone_pair_init_and_renew() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("pair");
    let out = tandem(&[
        "--json",
        "cluster",
        "init",
        "--standalone",
        "host-a",
        "host-b",
        "--state-dir",
        s(&dir),
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let first = tandem_pki::Identity::load(&dir.join("hosts/host-a")).unwrap();
    assert_eq!(first.role(), tandem_pki::Role::Host);
    assert!(dir.join("hosts/host-b/identity.pem").exists());
    let renew = tandem(&["cluster", "renew", "--standalone", "--state-dir", s(&dir)]).await;
    assert_eq!(renew.code, 0, "{}", renew.stderr);
    let second = tandem_pki::Identity::load(&dir.join("hosts/host-a")).unwrap();
    assert_ne!(first.serial(), second.serial());
    assert_eq!(first.cluster_id(), second.cluster_id());
    // Without --standalone: usage.
    assert_eq!(
        tandem(&["cluster", "renew", "--state-dir", s(&dir)])
            .await
            .code,
        2
    );
}

/// `tandem dvs`: an invalid document is exit 8 with its field paths; a
/// change no host could take is exit 7, recorded in the history, and the
/// switch stays where it was. (Changes that commit need real tandemd
/// hosts: the workspace's end-to-end tests.)
#[tokio::test]
async fn dvs_apply_show_history_and_exit_codes() {
    let d = tempfile::tempdir().unwrap();
    let state: PathBuf = d.path().join("manager");
    let op = state.join("operator");
    let init = tandem(&["cluster", "init", "--state-dir", s(&state)]).await;
    assert_eq!(init.code, 0, "{}", init.stderr);
    let served = start(&state).await;
    let addr = served.addr.clone();
    let m = ["--identity", s(&op), "--manager", addr.as_str()];
    let run = |args: Vec<&str>| {
        let mut v = args;
        v.extend(m);
        let v: Vec<String> = v.into_iter().map(String::from).collect();
        async move {
            let r: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
            tandem(&r).await
        }
    };
    let t = run(vec!["--json", "token", "create"]).await;
    let token = t.json()["token"].as_str().unwrap().to_string();
    let host_state = d.path().join("host-a");
    let j = tandem(&[
        "host",
        "join",
        &addr,
        "--token",
        &token,
        "--name",
        "host-a",
        "--state-dir",
        s(&host_state),
    ])
    .await;
    assert_eq!(j.code, 0, "{}", j.stderr);

    let doc = |host: &str| {
        format!(
            "[[port_group]]\nname = \"mgmt\"\nvlan = 10\n\n[[host]]\nname = \"{host}\"\n[[host.host_port]]\nname = \"mgmt\"\ntap = \"tdm-mgmt\"\nport_group = \"mgmt\"\n"
        )
    };
    let bad = d.path().join("bad.toml");
    std::fs::write(&bad, doc("host-x")).unwrap();
    let o = run(vec!["dvs", "apply", s(&bad), "--timeout", "5"]).await;
    assert_eq!(o.code, 8, "{}", o.stderr);
    assert!(o.stderr.contains("host[0].name"), "{}", o.stderr);
    let good = d.path().join("good.toml");
    std::fs::write(&good, doc("host-a")).unwrap();
    let o = run(vec!["dvs", "apply", s(&good), "--timeout", "4"]).await;
    assert_eq!(o.code, 8, "{}", o.stderr);

    // host-a never reported its API address: the canary is not applied.
    let o = run(vec!["dvs", "apply", s(&good), "--timeout", "5"]).await;
    assert_eq!(o.code, 7, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("rolled-back"), "{}", o.stdout);
    assert!(o.stdout.contains("not-applied"), "{}", o.stdout);
    let o = run(vec!["--json", "dvs", "apply", s(&good), "--timeout", "5"]).await;
    assert_eq!(o.code, 7, "{}", o.stderr);
    assert_eq!(o.json()["revision"], 2);
    assert_eq!(o.json()["outcome"], "rolled-back");

    let show = run(vec!["--json", "dvs", "show"]).await;
    assert_eq!(show.code, 0, "{}", show.stderr);
    assert_eq!(show.json()["revision"], 0);
    assert_eq!(show.json()["hosts"][0]["state"], "failed");
    let human = run(vec!["dvs", "show"]).await;
    assert!(human.stdout.contains("host-a"), "{}", human.stdout);
    let h = run(vec!["--json", "dvs", "history"]).await;
    assert_eq!(h.code, 0, "{}", h.stderr);
    assert_eq!(h.json().as_array().unwrap().len(), 2);
    let r = run(vec!["dvs", "rollback", "9", "--timeout", "5"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    stop(served).await;
}
