//! The cluster on a management fabric: a real `tandem-manager` and real
//! tandemds in network namespaces, where the manager reaches each host only
//! through that host's tandem switch (see `harness::fabric`). One fabric,
//! one manager and two hosts serve every phase, in order; each phase says
//! what it checks.
//!
//! Needs root (namespaces, taps, AF_PACKET).

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tandem_tests::fabric::{
    host_switch_doc, wait_for, Fabric, ManagerProc, HOST_API_PORT, MANAGER_IP,
};
use tandem_tests::{serial_guard, Daemon, Netns};

struct Host {
    name: &'static str,
    ip: &'static str,
    ns: Netns,
    daemon: Daemon,
    /// The switch document it started with.
    doc: PathBuf,
    _docs: tempfile::TempDir,
}

impl Host {
    fn start(
        fabric: &Fabric,
        name: &'static str,
        tag: &str,
        ip: &'static str,
        extra: &str,
    ) -> Host {
        let ns = fabric.add_host(tag);
        let docs = tempfile::tempdir().unwrap();
        let doc = docs.path().join("switch.toml");
        std::fs::write(&doc, host_switch_doc(ip, extra)).unwrap();
        let daemon = Daemon::start_in_netns(&ns.name, &["--switch-config", doc.to_str().unwrap()]);
        Host {
            name,
            ip,
            ns,
            daemon,
            doc,
            _docs: docs,
        }
    }

    /// Restarts tandemd with its cluster identity and the host API.
    fn serve_host_api(&mut self) {
        let advertise = format!("{}:{HOST_API_PORT}", self.ip);
        let listen = format!("0.0.0.0:{HOST_API_PORT}");
        self.daemon.set_args(&[
            "--switch-config",
            self.doc.to_str().unwrap(),
            "--host-api",
            &listen,
            "--host-api-advertise",
            &advertise,
        ]);
        self.daemon.restart(libc::SIGTERM);
    }

    fn digest(&self) -> String {
        self.daemon.cli_json(&["switch", "txn"])["running_digest"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {}: {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn host_view(m: &ManagerProc, name: &str) -> Value {
    m.json(&["host", "show", name])
}

#[test]
fn the_cluster_on_a_management_fabric() {
    let _g = serial_guard();
    let fabric = Fabric::new("cl");
    let mut manager = ManagerProc::start(&fabric.mgr);
    let mut a = Host::start(
        &fabric,
        "ha",
        "cla",
        "10.231.0.11",
        "\n[[port_group]]\nname = \"web\"\nvlan = 30\n",
    );
    let mut b = Host::start(
        &fabric,
        "hb",
        "clb",
        "10.231.0.12",
        "\n[[port_group]]\nname = \"db\"\nvlan = 30\n\n[[port_group]]\nname = \"backup\"\nvlan = 30\n",
    );

    // The management path is the switch: the host reaches the manager
    // through its host port and uplink.
    for h in [&a, &b] {
        h.ns.run(&["ping", "-c", "1", "-W", "5", MANAGER_IP]);
    }

    // ---- join, then serve the host API with the identity.
    for h in [&mut a, &mut b] {
        manager.join(&h.ns, h.name, &h.daemon.state_dir);
        h.serve_host_api();
    }
    for h in [&a, &b] {
        wait_for(
            &format!("{} online with an inventory and its host API", h.name),
            Duration::from_secs(30),
            || {
                let v = host_view(&manager, h.name);
                (v["connection"] == "online"
                    && v["inventory"].is_object()
                    && v["host_api"] == format!("{}:{HOST_API_PORT}", h.ip))
                .then_some(())
            },
        );
    }

    // ---- inventory: what the manager holds is what each host reports
    // about itself (different port groups, its own state directory).
    for h in [&a, &b] {
        let inv = host_view(&manager, h.name)["inventory"].clone();
        let mut reported: Vec<String> = inv["port_groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap().to_string())
            .collect();
        let doc = h.daemon.cli_json(&["switch", "show"])["document_toml"]
            .as_str()
            .unwrap()
            .to_string();
        let doc: toml::Value = toml::from_str(&doc).unwrap();
        let mut own: Vec<String> = doc["port_group"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap().to_string())
            .collect();
        own.sort();
        reported.sort();
        assert_eq!(reported, own, "{}: port groups", h.name);
        let state = h.daemon.state_dir.display().to_string();
        assert!(
            inv["datastores"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["path"] == state.as_str() && d["free_bytes"].as_u64() > Some(0)),
            "{}: datastores {inv}",
            h.name
        );
        assert_eq!(inv["uplinks"][0]["name"], "up0", "{}: {inv}", h.name);
    }
    let a_groups = host_view(&manager, "ha")["inventory"]["port_groups"].clone();
    let b_groups = host_view(&manager, "hb")["inventory"]["port_groups"].clone();
    assert_ne!(a_groups, b_groups, "the two hosts differ");

    // ---- the host API: an operator may; a host certificate may not, nor
    // a certificate of another cluster.
    let ok = manager.remote("ha", a.ip, &["--json", "switch", "txn"]);
    assert!(ok.status.success(), "{}", text(&ok));
    let st: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(st["running_digest"].as_str().unwrap(), a.digest());
    let as_host = std::process::Command::new("ip")
        .args(["netns", "exec", &fabric.mgr.name])
        .arg(tandem_tests::bin("tandem"))
        .arg("--remote")
        .arg(format!("ha@{}:{HOST_API_PORT}", a.ip))
        .arg("--remote-identity")
        .arg(b.daemon.state_dir.join("identity"))
        .args(["switch", "txn"])
        .output()
        .unwrap();
    assert!(
        !as_host.status.success(),
        "a host certificate was admitted: {}",
        text(&as_host)
    );
    let other = tempfile::tempdir().unwrap();
    let init = std::process::Command::new(tandem_tests::bin("tandem"))
        .args(["cluster", "init", "--name", "other", "--state-dir"])
        .arg(other.path().join("m"))
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init));
    let foreign = std::process::Command::new("ip")
        .args(["netns", "exec", &fabric.mgr.name])
        .arg(tandem_tests::bin("tandem"))
        .arg("--remote")
        .arg(format!("ha@{}:{HOST_API_PORT}", a.ip))
        .arg("--remote-identity")
        .arg(other.path().join("m/operator"))
        .args(["switch", "txn"])
        .output()
        .unwrap();
    assert!(
        !foreign.status.success(),
        "another cluster's operator was admitted: {}",
        text(&foreign)
    );
    assert!(
        a.daemon.log().contains("host API: TLS handshake refused"),
        "the refusals are logged"
    );

    // ---- on a managed host a plain local apply is refused with the
    // reason; a local transaction works and rolls back unless confirmed.
    let plain = a.daemon.cli(&["switch", "apply", a.doc.to_str().unwrap()]);
    assert!(!plain.status.success());
    assert!(text(&plain).contains("managed"), "{}", text(&plain));
    let before = a.digest();
    let changed = a._docs.path().join("web40.toml");
    std::fs::write(
        &changed,
        host_switch_doc(a.ip, "\n[[port_group]]\nname = \"web\"\nvlan = 40\n"),
    )
    .unwrap();
    let tried = a.daemon.cli_json(&[
        "switch",
        "try",
        changed.to_str().unwrap(),
        "--timeout",
        "30",
    ]);
    let txid = tried["txid"].as_str().unwrap().to_string();
    assert_ne!(a.digest(), before);
    a.daemon.cli_ok(&["switch", "confirm", &txid]);
    let st = a.daemon.cli_json(&["switch", "txn"]);
    assert!(st["pending"].is_null(), "{st}");
    assert_eq!(st["last"]["outcome"], "committed");
    assert!(a.daemon.log().contains(&format!("committed({txid})")));

    // ---- crash while pending: the restarted tandemd restores before it
    // serves.
    let committed = a.digest();
    let cut = a._docs.path().join("cut.toml");
    std::fs::write(
        &cut,
        host_switch_doc(a.ip, "").replace("vlan = 10", "vlan = 20"),
    )
    .unwrap();
    a.daemon
        .cli_json(&["switch", "try", cut.to_str().unwrap(), "--timeout", "60"]);
    assert_ne!(a.digest(), committed);
    a.daemon.restart(libc::SIGKILL);
    assert_eq!(a.digest(), committed, "restored at start");
    let st = a.daemon.cli_json(&["switch", "txn"]);
    assert_eq!(st["last"]["outcome"], "restored-at-start", "{st}");
    assert!(st["pending"].is_null());
    a.ns.run(&["ping", "-c", "1", "-W", "5", MANAGER_IP]);

    // ---- manager restart: forwarding between the hosts never stops, and
    // the hosts come back online.
    let ping = {
        let ns = a.ns.name.clone();
        let target = b.ip.to_string();
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns, "ping", "-c", "200", "-i", "0.02", "-W", "1", &target,
                ])
                .output()
                .unwrap()
        })
    };
    let seen_before: Vec<u64> = ["ha", "hb"]
        .iter()
        .map(|h| host_view(&manager, h)["last_seen"].as_u64().unwrap_or(0))
        .collect();
    manager.restart();
    let pinged = ping.join().unwrap();
    let out = String::from_utf8_lossy(&pinged.stdout);
    assert!(
        out.contains(" 0% packet loss"),
        "frames were lost between the hosts while the manager restarted: {out}"
    );
    for (i, h) in ["ha", "hb"].iter().enumerate() {
        wait_for(
            &format!("{h} heard from again after the manager's restart"),
            Duration::from_secs(40),
            || {
                let v = host_view(&manager, h);
                (v["connection"] == "online"
                    && v["last_seen"].as_u64().unwrap_or(0) > seen_before[i])
                    .then_some(())
            },
        );
    }
    assert_eq!(
        a.digest(),
        committed,
        "the manager's restart changed no switch"
    );
}
