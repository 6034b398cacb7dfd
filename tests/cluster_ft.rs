//! Fault tolerance on managed hosts: `tandem protect` records the VM's
//! authority with the manager by itself (no operator step), the backup
//! admits the primary by that record, a live migration hands the record
//! and the protection to the destination, and after a takeover the record
//! follows the VM to its new host.
//!
//! A real manager and two tandemds in network namespaces on the
//! management fabric (`harness::fabric`); replication goes host to host
//! over the fabric by TCP, mutual TLS with the hosts' certificates.
//! Needs root (namespaces, taps, AF_PACKET).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::fabric::{host_switch_doc, wait_for, Fabric, ManagerProc, HOST_API_PORT};
use tandem_tests::{serial_guard, tail, Daemon, Netns, READY};

const BOOT: Duration = Duration::from_secs(90);
const REPL_PORT: u16 = 7400;

struct Host {
    name: &'static str,
    ip: &'static str,
    ns: Netns,
    daemon: Daemon,
    doc: PathBuf,
    _docs: tempfile::TempDir,
}

impl Host {
    fn start(fabric: &Fabric, name: &'static str, tag: &str, ip: &'static str) -> Host {
        let ns = fabric.add_host(tag);
        let docs = tempfile::tempdir().unwrap();
        let doc = docs.path().join("switch.toml");
        std::fs::write(&doc, host_switch_doc(ip, "")).unwrap();
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

    /// Restarts tandemd with the identity the join wrote, and `extra`.
    fn restart_with(&mut self, extra: &[&str]) {
        let mut args = vec!["--switch-config", self.doc.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.daemon.set_args(&args);
        self.daemon.restart(libc::SIGTERM);
    }

    /// [`Host::restart_with`], serving the host API on its address too
    /// (the operator's CLI reaches it over mutual TLS).
    fn restart_serving(&mut self, extra: &[&str]) {
        let listen = format!("{}:{HOST_API_PORT}", self.ip);
        let mut args = vec!["--host-api", listen.as_str()];
        args.extend_from_slice(extra);
        self.restart_with(&args);
    }

    /// The VM's first FT status on this host, if any.
    fn ft(&self, vm: &str) -> Option<Value> {
        let out = self.daemon.cli(&["--json", "ft", "status", vm]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.first().cloned()
    }

    fn wait_ft(&self, vm: &str, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.ft(vm);
            if st.as_ref().is_some_and(&pred) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what} not reached within {timeout:?}; status: {st:?}\ntandemd log:\n{}",
                self.name,
                tail(&self.daemon.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The manager's record of VM `uuid`, if it has one.
fn record(m: &ManagerProc, uuid: &str) -> Option<Value> {
    m.json(&["cluster", "vms"])
        .as_array()?
        .iter()
        .find(|v| v["uuid"] == uuid)
        .cloned()
}

#[test]
fn protect_records_the_vm_and_a_takeover_moves_the_record() {
    let _g = serial_guard();
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());
    let fabric = Fabric::new("cf");
    let manager = ManagerProc::start(&fabric.mgr);
    let mut a = Host::start(&fabric, "ha", "cfa", "10.231.0.21");
    let mut b = Host::start(&fabric, "hb", "cfb", "10.231.0.22");
    let mut c = Host::start(&fabric, "hc", "cfc", "10.231.0.23");

    phase("join the hosts; B listens for replication on its host port");
    let repl = format!("{}:{REPL_PORT}", b.ip);
    manager.join(&a.ns, a.name, &a.daemon.state_dir);
    manager.join(&b.ns, b.name, &b.daemon.state_dir);
    manager.join(&c.ns, c.name, &c.daemon.state_dir);
    a.restart_serving(&[]);
    b.restart_serving(&["--repl-listen", &repl]);
    c.restart_serving(&[]);
    for h in [&a, &b, &c] {
        wait_for(
            &format!("{} online", h.name),
            Duration::from_secs(30),
            || (manager.json(&["host", "show", h.name])["connection"] == "online").then_some(()),
        );
    }

    phase("boot a guest on A and protect it to B: no operator step");
    a.daemon.create_guest("web", "");
    a.daemon.cli_ok(&["vm", "start", "web"]);
    a.daemon.wait_console("web", READY, BOOT);
    let uuid = a.daemon.info("web")["uuid"]
        .as_str()
        .expect("uuid")
        .to_string();
    assert!(
        record(&manager, &uuid).is_none(),
        "no record before protect"
    );
    a.daemon
        .cli_ok(&["protect", "web", "--backup", &format!("{}@{repl}", b.name)]);
    let rec = record(&manager, &uuid).expect("protect made the record");
    assert_eq!(rec["primary"], a.name, "{rec:#}");
    assert_eq!(rec["backup"], b.name, "{rec:#}");
    assert_eq!(rec["updated_by"], a.name, "{rec:#}");
    let generation = rec["generation"].as_u64().expect("generation");
    assert_eq!(generation, 1, "{rec:#}");
    a.wait_ft("web", "protected", Duration::from_secs(60), |s| {
        s["state"] == "protected" && s["last_committed"].as_u64().unwrap_or(0) >= 3
    });
    b.wait_ft("web", "standby", Duration::from_secs(10), |s| {
        s["state"] == "standby"
    });
    assert!(
        b.daemon.log().contains("ha (host,"),
        "B knows its primary by its certificate:\n{}",
        tail(&b.daemon.log(), 40)
    );

    phase("migrate it onto its own backup: refused, nothing changes");
    let refused = manager.remote(a.name, a.ip, &["migrate", "web", "--to", b.name]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("its own backup host"),
        "{err}"
    );
    assert_eq!(record(&manager, &uuid).unwrap()["generation"], generation);

    phase("migrate it A -> C: the record and the protection follow");
    let out = manager.remote(a.name, a.ip, &["--json", "migrate", "web", "--to", c.name]);
    assert!(
        out.status.success(),
        "{}
A:
{}
C:
{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&a.daemon.log(), 30),
        tail(&c.daemon.log(), 30)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(report["phase"], "done", "{report:#}");
    assert!(
        report["first_commit_ms"].as_u64().is_some(),
        "{report:#}\n{}\nB:\n{}\nC:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&b.daemon.log(), 30),
        tail(&c.daemon.log(), 30)
    );
    let rec = record(&manager, &uuid).expect("the record");
    assert_eq!(rec["primary"], c.name, "{rec:#}");
    assert_eq!(rec["backup"], b.name, "{rec:#}");
    assert_eq!(rec["generation"].as_u64(), Some(generation + 1), "{rec:#}");
    assert!(
        a.daemon.qemu_processes().is_empty(),
        "the source's QEMU is left"
    );
    assert_eq!(c.daemon.info("web")["state"], "running");
    c.wait_ft("web", "protected on C", Duration::from_secs(30), |s| {
        s["state"] == "protected"
    });
    b.wait_ft("web", "standby for C", Duration::from_secs(10), |s| {
        s["state"] == "standby"
    });
    assert!(
        b.daemon.log().contains("supersedes the connected one"),
        "B took C's newer generation over A's session:\n{}",
        tail(&b.daemon.log(), 40)
    );
    let generation = generation + 1;

    phase("kill C's QEMU: B takes over, and the record follows");
    let pid = c.daemon.info("web")["pid"].as_u64().expect("pid") as i32;
    // SAFETY: kill(2) of the QEMU this test's tandemd started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    b.wait_ft("web", "takeover", Duration::from_secs(60), |s| {
        s["state"] == "failed-over"
    });
    assert_eq!(b.daemon.info("web")["state"], "running");
    let moved = wait_for(
        "the manager's record names B as primary",
        Duration::from_secs(30),
        || record(&manager, &uuid).filter(|r| r["primary"] == b.name),
    );
    assert_eq!(
        moved["generation"].as_u64(),
        Some(generation + 1),
        "{moved:#}"
    );
    assert!(moved["backup"].is_null(), "{moved:#}");
    assert_eq!(moved["updated_by"], b.name, "{moved:#}");
    let st = b.ft("web").expect("B's status");
    assert!(
        !st["detail"]
            .as_str()
            .unwrap_or("")
            .contains("still names the old primary"),
        "{st:#}"
    );
    phase("done");
}
