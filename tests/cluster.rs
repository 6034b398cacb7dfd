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

/// One host's part of a distributed switch document.
struct Part<'a> {
    name: &'a str,
    ip: &'a str,
    /// The uplink's `interfaces` list, TOML.
    uplink: &'a str,
    /// Its management host port (absent: removed).
    host_port: bool,
    /// More TOML in the host's table (another uplink, say).
    extra: &'a str,
}

fn part<'a>(h: &'a Host) -> Part<'a> {
    Part {
        name: h.name,
        ip: h.ip,
        uplink: r#"["up0"]"#,
        host_port: true,
        extra: "",
    }
}

/// The fabric's distributed switch: `mgmt` (with `mgmt` TOML lines, e.g.
/// `vlan = 10`), the trunk uplink group, `shared` more port groups, and
/// each host's uplink and management host port.
fn dvs_doc(mgmt: &str, shared: &str, parts: &[Part]) -> String {
    let mut d = format!(
        "[[port_group]]\nname = \"mgmt\"\n{mgmt}\n\n[[port_group]]\nname = \"trunk\"\nvlan_mode = \"trunk\"\nnative_vlan = 10\nallowed_vlans = [30]\n{shared}\n"
    );
    for p in parts {
        d.push_str(&format!(
            "\n[[host]]\nname = \"{}\"\n[[host.uplink]]\nname = \"up\"\ninterfaces = {}\nport_group = \"trunk\"\n",
            p.name, p.uplink
        ));
        if p.host_port {
            d.push_str(&format!(
                "[[host.host_port]]\nname = \"mgmt\"\ntap = \"mgmt0\"\nport_group = \"mgmt\"\naddresses = [\"{}/24\"]\n",
                p.ip
            ));
        }
        d.push_str(p.extra);
    }
    d
}

/// `tandem --json dvs apply` of `doc` with `timeout` s and `canary`:
/// exit code and report.
fn dvs_apply(
    m: &ManagerProc,
    dir: &std::path::Path,
    doc: &str,
    timeout: u32,
    canary: &str,
) -> (i32, Value) {
    let f = dir.join("dvs.toml");
    std::fs::write(&f, doc).unwrap();
    let t = timeout.to_string();
    let out = m.tandem(&[
        "--json",
        "dvs",
        "apply",
        f.to_str().unwrap(),
        "--timeout",
        &t,
        "--canary",
        canary,
    ]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "dvs apply printed no report ({e}): {}\nmanager log:\n{}",
            text(&out),
            tandem_tests::tail(&m.log(), 40)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn dvs_host(m: &ManagerProc, host: &str) -> Value {
    let v = m.json(&["dvs", "show"]);
    v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .cloned()
        .unwrap_or(Value::Null)
}

fn outcome<'a>(report: &'a Value, host: &str) -> &'a Value {
    report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .unwrap_or_else(|| panic!("{host} not in {report}"))
}

impl Host {
    /// Waits for the host's own word that `txid` ended with `outcome`.
    fn wait_ended(&self, txid: &str, outcome: &str, timeout: Duration) -> Value {
        wait_for(
            &format!("{}: {txid} ended {outcome}", self.name),
            timeout,
            || {
                let st = self.daemon.cli_json(&["switch", "txn"]);
                (st["last"]["txid"] == txid
                    && st["last"]["outcome"] == outcome
                    && st["pending"].is_null())
                .then_some(st)
            },
        )
    }

    fn arm(&self, fault: Value) {
        let (code, body) = self.daemon.api_post("/v1/faults/switch-txn", &fault);
        assert_eq!(code, 200, "arming {fault}: {body}");
    }
}

#[test]
fn the_cluster_on_a_management_fabric() {
    let _g = serial_guard();
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());
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

    phase("join, then serve the host API with the identity.");
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

    phase("inventory: what the manager holds is what each host reports");
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

    phase("the host API: an operator may; a host certificate may not, n");
    // ---- the host API: an operator may; a host certificate may not, nor
    // a certificate of another cluster.
    let ok = manager.remote("ha", a.ip, &["--json", "switch", "txn"]);
    assert!(ok.status.success(), "{}", text(&ok));
    let st: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(st["running_digest"].as_str().unwrap(), a.digest());
    // By name alone: the manager says where the host's API is.
    let by_name = std::process::Command::new("ip")
        .args(["netns", "exec", &fabric.mgr.name])
        .arg(tandem_tests::bin("tandem"))
        .args(["--remote", "hb", "--remote-identity"])
        .arg(manager.operator())
        .args(["--json", "switch", "txn"])
        .output()
        .unwrap();
    assert!(by_name.status.success(), "{}", text(&by_name));
    let st: Value = serde_json::from_slice(&by_name.stdout).unwrap();
    assert_eq!(st["running_digest"].as_str().unwrap(), b.digest());

    // Live migration by host names alone, as the operator: the manager
    // says where each host's API is, both are reached over mutual TLS, and
    // QEMU's stream runs over TLS with the hosts' certificates.
    a.daemon.create_guest("mg", "");
    a.daemon.cli_ok(&["vm", "start", "mg"]);
    a.daemon
        .wait_console("mg", tandem_tests::READY, Duration::from_secs(90));
    let uuid = a.daemon.info("mg")["uuid"].as_str().unwrap().to_string();
    let migrated = std::process::Command::new("ip")
        .args(["netns", "exec", &fabric.mgr.name])
        .arg(tandem_tests::bin("tandem"))
        .args(["--remote", "ha", "--remote-identity"])
        .arg(manager.operator())
        .args(["--json", "migrate", "mg", "--to", "hb"])
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{}", text(&migrated));
    let last = String::from_utf8_lossy(&migrated.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let report: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(report["phase"], "done", "{report}");
    let moved = b.daemon.info("mg");
    assert_eq!(moved["state"], "running", "{moved}");
    assert_eq!(moved["uuid"], uuid.as_str());
    assert!(b.daemon.log().contains("tls=true"));
    assert!(!a.daemon.cli_ok(&["vm", "list"]).contains("mg"));
    b.daemon.cli_ok(&["vm", "destroy", "mg"]);
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

    phase("on a managed host a plain local apply is refused with the");
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

    phase("crash while pending: the restarted tandemd restores before i");
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

    phase("manager restart: forwarding between the hosts never stops, a");
    // ---- manager restart: forwarding between the hosts never stops, and
    // the hosts come back online. The path is warmed first (neighbour
    // entries, the restarted switch's learning) so that what the window
    // below measures is the manager's restart alone.
    let b_ip = b.ip.to_string();
    wait_for(
        "a reply from host b before the manager restarts",
        Duration::from_secs(20),
        || {
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &a.ns.name, "ping", "-c", "1", "-W", "1", &b_ip,
                ])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        },
    );
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

    // ================= the distributed switch (seed 000) =================
    let work = tempfile::tempdir().unwrap();
    let reach = |h: &Host| {
        manager
            .remote(h.name, h.ip, &["switch", "txn"])
            .status
            .success()
    };
    let base = dvs_doc(
        "vlan = 10",
        "\n[[port_group]]\nname = \"web\"\nvlan = 30\n",
        &[part(&a), part(&b)],
    );

    phase("T000-1 (commit path, 30 s): both hosts commit; the commit di");
    // T000-1 (commit path, 30 s): both hosts commit; the commit disarmed
    // each deadline (nothing pending, committed(txid) logged) without
    // waiting for it.
    let (code, r) = dvs_apply(&manager, work.path(), &base, 30, "ha");
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["outcome"], "completed", "{r}");
    for h in [&a, &b] {
        let o = outcome(&r, h.name);
        assert_eq!(o["result"], "committed", "{r}");
        let st = h.daemon.cli_json(&["switch", "txn"]);
        assert!(st["pending"].is_null(), "{st}");
        assert_eq!(st["last"]["outcome"], "committed");
        let txid = o["txid"].as_str().unwrap();
        assert!(h.daemon.log().contains(&format!("committed({txid})")));
        assert!(!h.daemon.state_dir.join("switch.pending.json").exists());
        let v = dvs_host(&manager, h.name);
        assert_eq!(v["state"], "in-sync", "{v}");
        assert_eq!(v["matches_current"], true, "{v}");
        assert_eq!(
            v["digest"], st["running_digest"],
            "the manager's view is what the host runs"
        );
    }
    let rev1 = r["revision"].as_u64().unwrap();
    phase("A change of a port group that carries no management: commits");
    // A change of a port group that carries no management: commits.
    let vmnet = dvs_doc(
        "vlan = 10",
        "\n[[port_group]]\nname = \"web\"\nvlan = 30\n\n[[port_group]]\nname = \"vmnet\"\nvlan = 30\n",
        &[part(&a), part(&b)],
    );
    let (code, r) = dvs_apply(&manager, work.path(), &vmnet, 30, "ha");
    assert_eq!((code, r["outcome"].as_str()), (0, Some("completed")), "{r}");
    let good = r["revision"].as_u64().unwrap();
    assert!(good > rev1);
    let good_digest = [a.digest(), b.digest()];

    // A cut, ended by the host's own rollback; the manager shows the host
    // out of sync, then resynced, and the other host never got the change.
    let cut_and_check = |label: &str, doc: &str, canary: &Host, other: &Host| {
        phase(label);
        let (code, r) = dvs_apply(&manager, work.path(), doc, 5, canary.name);
        assert_eq!(code, 7, "{label}: {r}");
        assert_eq!(r["outcome"], "rolled-back", "{label}: {r}");
        assert_eq!(r["current_revision"].as_u64(), Some(good), "{label}: {r}");
        let o = outcome(&r, canary.name);
        assert_ne!(o["result"], "committed", "{label}: {r}");
        let txid = o["txid"]
            .as_str()
            .unwrap_or_else(|| panic!("{label}: no txid: {r}"))
            .to_string();
        assert_eq!(outcome(&r, other.name)["result"], "skipped", "{label}: {r}");
        canary.wait_ended(&txid, "rolled-back", Duration::from_secs(20));
        let i = if canary.name == "ha" { 0 } else { 1 };
        assert_eq!(canary.digest(), good_digest[i], "{label}: restored");
        assert!(
            reach(canary),
            "{label}: the manager reaches {} again",
            canary.name
        );
        wait_for(
            &format!("{label}: {} resynced", canary.name),
            Duration::from_secs(20),
            || {
                let v = dvs_host(&manager, canary.name);
                (v["state"] == "resynced" && v["revision"].as_u64() == Some(good)).then_some(())
            },
        );
        assert_eq!(
            other.digest(),
            good_digest[1 - i],
            "{label}: the other host untouched"
        );
        txid
    };

    phase("T000-2: the management VLAN 10 -> 20.");
    // T000-2: the management VLAN 10 -> 20.
    let vlan20 = dvs_doc("vlan = 20", "", &[part(&a), part(&b)]);
    let late = cut_and_check("VLAN cut", &vlan20, &a, &b);
    phase("T000-6: the late commit is refused and changes nothing.");
    // T000-6: the late commit is refused and changes nothing.
    let l = manager.remote(a.name, a.ip, &["switch", "confirm", &late]);
    assert!(
        !l.status.success() && text(&l).contains("no switch transaction is pending"),
        "{}",
        text(&l)
    );
    assert_eq!(a.digest(), good_digest[0]);

    phase("T000-5: a stale commit is ignored; the pending one stays");
    let running = work.path().join("running.toml");
    std::fs::write(
        &running,
        a.daemon.cli_json(&["switch", "show"])["document_toml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let tried = manager.remote(
        a.name,
        a.ip,
        &[
            "--json",
            "switch",
            "try",
            running.to_str().unwrap(),
            "--timeout",
            "30",
        ],
    );
    assert!(tried.status.success(), "{}", text(&tried));
    let txid = serde_json::from_slice::<Value>(&tried.stdout).unwrap()["txid"]
        .as_str()
        .unwrap()
        .to_string();
    let stale = manager.remote(a.name, a.ip, &["switch", "confirm", "m-older-txid"]);
    assert!(!stale.status.success(), "{}", text(&stale));
    assert!(
        text(&stale).contains("not the pending one"),
        "{}",
        text(&stale)
    );
    let st = a.daemon.cli_json(&["switch", "txn"]);
    assert_eq!(st["pending"]["txid"], txid.as_str(), "{st}");
    assert_eq!(
        st["pending"]["origin"], "manager",
        "over the host API: {st}"
    );
    let ok = manager.remote(a.name, a.ip, &["switch", "confirm", &txid]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert_eq!(a.digest(), good_digest[0]);

    phase("T000-8: timeouts outside 5..=60 s are refused");
    for t in [4, 61] {
        let (code, r) = {
            let f = work.path().join("t8.toml");
            std::fs::write(&f, &vmnet).unwrap();
            let out = manager.tandem(&[
                "dvs",
                "apply",
                f.to_str().unwrap(),
                "--timeout",
                &t.to_string(),
            ]);
            (out.status.code().unwrap_or(-1), text(&out))
        };
        assert_ne!(code, 0, "timeout {t}: {r}");
        assert!(
            r.contains("timeout") || r.contains("5..=60") || r.contains("60"),
            "timeout {t}: {r}"
        );
    }
    assert_eq!(
        manager.json(&["dvs", "show"])["revision"].as_u64(),
        Some(good)
    );

    phase("T000-10, the catalogue of cuts: a blocked management group, ");
    // T000-10, the catalogue of cuts: a blocked management group, the host
    // port's address moved, the host port removed, the uplink failing over
    // to a member without carrier.
    cut_and_check(
        "blocked mgmt",
        &dvs_doc("vlan = 10\nblocked = true", "", &[part(&a), part(&b)]),
        &a,
        &b,
    );
    cut_and_check(
        "host port address",
        &dvs_doc(
            "vlan = 10",
            "",
            &[
                Part {
                    ip: "10.231.0.21",
                    ..part(&a)
                },
                part(&b),
            ],
        ),
        &a,
        &b,
    );
    cut_and_check(
        "host port removed",
        &dvs_doc(
            "vlan = 10",
            "",
            &[
                part(&a),
                Part {
                    host_port: false,
                    ..part(&b)
                },
            ],
        ),
        &b,
        &a,
    );
    b.ns.run(&[
        "ip", "link", "add", "dead0", "type", "veth", "peer", "name", "dead1",
    ]);
    b.ns.run(&["ip", "link", "set", "dead0", "up"]);
    cut_and_check(
        "uplink to a dead member",
        &dvs_doc(
            "vlan = 10",
            "",
            &[
                part(&a),
                Part {
                    uplink: r#"["dead0"]"#,
                    ..part(&b)
                },
            ],
        ),
        &b,
        &a,
    );

    phase("T000-3: manager -> host lost right after the apply (a fault ");
    // T000-3: manager -> host lost right after the apply (a fault hook
    // armed at the apply): the return arrives, the commit never does; the
    // manager must not call it completed, and the host rolls back.
    let harmless = dvs_doc(
        "vlan = 10",
        "\n[[port_group]]\nname = \"extra\"\nvlan = 30\n",
        &[part(&a), part(&b)],
    );
    a.arm(serde_json::json!({"drop_from_peer": true, "peer": MANAGER_IP}));
    let (code, r) = dvs_apply(&manager, work.path(), &harmless, 5, "ha");
    assert_eq!(code, 7, "commit lost: {r}");
    assert_ne!(r["outcome"], "completed", "{r}");
    let o = outcome(&r, "ha");
    assert_ne!(o["result"], "committed", "{r}");
    let txid = o["txid"].as_str().unwrap().to_string();
    a.wait_ended(&txid, "rolled-back", Duration::from_secs(20));
    assert!(a
        .daemon
        .log()
        .contains("FAULT INJECTION: management path cut"));
    wait_for(
        "ha resynced after the lost commit",
        Duration::from_secs(20),
        || (dvs_host(&manager, "ha")["state"] == "resynced").then_some(()),
    );

    phase("T000-4: host -> manager lost: the return never arrives; the ");
    // T000-4: host -> manager lost: the return never arrives; the manager
    // times out and reverts its model; the host rolls back.
    a.arm(serde_json::json!({"drop_to_peer": true, "peer": MANAGER_IP}));
    let (code, r) = dvs_apply(&manager, work.path(), &harmless, 5, "ha");
    assert_eq!(code, 7, "return lost: {r}");
    assert_eq!(r["current_revision"].as_u64(), Some(good), "{r}");
    let txid = outcome(&r, "ha")["txid"].as_str().unwrap().to_string();
    a.wait_ended(&txid, "rolled-back", Duration::from_secs(20));
    wait_for(
        "ha resynced after the lost return",
        Duration::from_secs(20),
        || (dvs_host(&manager, "ha")["state"] == "resynced").then_some(()),
    );

    phase("Across hosts: the canary commits, the wave's host is cut; th");
    // Across hosts: the canary commits, the wave's host is cut; the
    // manager stops and reverts the canary to the previous revision.
    let wave_cut = dvs_doc(
        "vlan = 10",
        "\n[[port_group]]\nname = \"extra\"\nvlan = 30\n",
        &[
            part(&a),
            Part {
                ip: "10.231.0.22",
                ..part(&b)
            },
        ],
    );
    let (code, r) = dvs_apply(&manager, work.path(), &wave_cut, 5, "ha");
    assert_eq!(code, 7, "{r}");
    assert_eq!(outcome(&r, "ha")["result"], "committed", "{r}");
    assert_eq!(
        outcome(&r, "ha")["revert"],
        "committed",
        "the canary reverted: {r}"
    );
    assert_ne!(outcome(&r, "hb")["result"], "committed", "{r}");
    let txid = outcome(&r, "hb")["txid"].as_str().unwrap().to_string();
    b.wait_ended(&txid, "rolled-back", Duration::from_secs(20));
    assert_eq!(
        a.digest(),
        good_digest[0],
        "canary back at the previous revision"
    );
    assert_eq!(b.digest(), good_digest[1]);
    assert_eq!(
        manager.json(&["dvs", "show"])["revision"].as_u64(),
        Some(good)
    );

    phase("The mutation check: with the rollback disabled (fault hook),");
    // The mutation check: with the rollback disabled (fault hook), the same
    // VLAN cut leaves the host cut off past its deadline, which is what
    // the checks above would catch.
    a.arm(serde_json::json!({"no_rollback": true}));
    let (code, r) = dvs_apply(&manager, work.path(), &vlan20, 5, "ha");
    assert_eq!(code, 7, "{r}");
    let txid = outcome(&r, "ha")["txid"].as_str().unwrap().to_string();
    wait_for(
        "the deadline passes without a rollback",
        Duration::from_secs(20),
        || a.daemon.log().contains("rollback disabled").then_some(()),
    );
    assert_ne!(
        a.digest(),
        good_digest[0],
        "without the rollback the cut stays"
    );
    let api = format!("{}:{HOST_API_PORT}", a.ip);
    let connects = fabric.mgr.within(move || {
        std::net::TcpStream::connect_timeout(&api.parse().unwrap(), Duration::from_secs(2)).is_ok()
    });
    assert!(!connects, "without the rollback the host stays cut off");
    // Repaired by hand on the host: confirm, then a local try of the good
    // configuration, confirmed.
    a.daemon.cli_ok(&["switch", "confirm", &txid]);
    let fix = work.path().join("fix.toml");
    std::fs::write(&fix, host_switch_doc(a.ip, "\n[[port_group]]\nname = \"web\"\nvlan = 30\n\n[[port_group]]\nname = \"vmnet\"\nvlan = 30\n")).unwrap();
    let t = a.daemon.cli_json(&["switch", "try", fix.to_str().unwrap()]);
    a.daemon
        .cli_ok(&["switch", "confirm", t["txid"].as_str().unwrap()]);
    assert!(reach(&a));

    phase("a rollback that cannot restore falls back, with an alarm");
    // ha runs a spare uplink; a cut removes it; while the cut is pending
    // the spare's interface vanishes, so the saved configuration cannot be
    // applied again: the host falls back to it without the vanished
    // interface (management comes back), raises an alarm, and the manager
    // shows the host failed.
    a.ns.run(&[
        "ip", "link", "add", "spare0", "type", "veth", "peer", "name", "spare1",
    ]);
    let spare = r#"[[host.uplink]]
name = "spare"
interfaces = ["spare0"]
port_group = "web"
"#;
    let shared = "\n[[port_group]]\nname = \"web\"\nvlan = 30\n\n[[port_group]]\nname = \"vmnet\"\nvlan = 30\n";
    let with_spare = dvs_doc(
        "vlan = 10",
        shared,
        &[
            Part {
                extra: spare,
                ..part(&a)
            },
            part(&b),
        ],
    );
    let (code, r) = dvs_apply(&manager, work.path(), &with_spare, 30, "ha");
    assert_eq!((code, r["outcome"].as_str()), (0, Some("completed")), "{r}");
    let cut_without_spare = dvs_doc("vlan = 20", shared, &[part(&a), part(&b)]);
    let (code, r) = std::thread::scope(|s| {
        let apply = s.spawn(|| dvs_apply(&manager, work.path(), &cut_without_spare, 5, "ha"));
        wait_for("the cut pending on ha", Duration::from_secs(10), || {
            let st = a.daemon.cli_json(&["switch", "txn"]);
            st["pending"].is_object().then_some(())
        });
        a.ns.run(&["ip", "link", "del", "spare0"]);
        apply.join().unwrap()
    });
    assert_eq!(code, 7, "{r}");
    let txid = outcome(&r, "ha")["txid"].as_str().unwrap().to_string();
    let st = a.wait_ended(&txid, "fallback", Duration::from_secs(20));
    assert!(
        st["alarm"]
            .as_str()
            .unwrap_or("")
            .contains("could not be rolled back"),
        "{st}"
    );
    assert!(
        reach(&a),
        "management is back on the fallback configuration"
    );
    wait_for(
        "the manager shows ha failed",
        Duration::from_secs(20),
        || (dvs_host(&manager, "ha")["state"] == "failed").then_some(()),
    );
    wait_for(
        "the alarm in ha's health (next heartbeat)",
        Duration::from_secs(20),
        || {
            host_view(&manager, "ha")["health"]["problems"]
                .as_array()
                .is_some_and(|p| {
                    p.iter().any(|x| {
                        x.as_str()
                            .unwrap_or("")
                            .contains("could not be rolled back")
                    })
                })
                .then_some(())
        },
    );
    // Fixed by applying a good configuration: committed, alarm cleared.
    let (code, r) = dvs_apply(&manager, work.path(), &vmnet, 30, "ha");
    assert_eq!((code, r["outcome"].as_str()), (0, Some("completed")), "{r}");
    assert!(a.daemon.cli_json(&["switch", "txn"])["alarm"].is_null());
}
