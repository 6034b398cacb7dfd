//! A management fabric in network namespaces, and a real manager on it.
//!
//! ```text
//!   mgr netns               fab netns                 host netns (one per host)
//!   m0 10.231.0.1/24 ══ br0 ══ v<tag> ─ up0 ── tandem switch ── tap mgmt0 10.231.0.1x/24
//!                                    uplink: trunk, native VLAN 10 (untagged), 30 tagged
//!                                                  host port: port group mgmt, VLAN 10
//! ```
//!
//! The manager reaches each host's API only through that host's tandem
//! switch: the host's management address is on a host port, and the only
//! way out is the switch's uplink, a trunk whose native (untagged) VLAN is
//! the management VLAN. (The fabric is untagged: this kernel has neither
//! 802.1Q interfaces nor VLAN-filtering bridges.) A switch
//! change to the management port group (its VLAN, blocking it), the host
//! port (its address, removing it) or the uplink really cuts the host off.
//!
//! Everything lives in namespaces this process creates (names carry its
//! pid), which are deleted on drop, on success and on panic.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bin, sh, tail, Netns};

/// The management subnet (inside the namespaces only).
pub const MGMT_PREFIX: &str = "10.231.0";
pub const MANAGER_IP: &str = "10.231.0.1";
pub const MANAGER_PORT: u16 = 7443;
pub const HOST_API_PORT: u16 = 7444;
pub const MGMT_VLAN: u16 = 10;

pub struct Fabric {
    /// Dropped last (fields drop in order): hosts' veths end with theirs.
    pub mgr: Netns,
    pub fab: Netns,
}

impl Fabric {
    pub fn new(tag: &str) -> Fabric {
        let fab = Netns::new(&format!("{tag}f"));
        let mgr = Netns::new(&format!("{tag}m"));
        fab.run(&["ip", "link", "add", "br0", "type", "bridge"]);
        fab.run(&["ip", "link", "set", "br0", "up"]);
        // m0 in mgr, its peer fm0 on the bridge.
        sh(&format!(
            "ip -n {f} link add fm0 type veth peer name m0 netns {m}",
            f = fab.name,
            m = mgr.name
        ));
        fab.run(&["ip", "link", "set", "fm0", "master", "br0", "up"]);
        mgr.run(&[
            "ip",
            "addr",
            "add",
            &format!("{MANAGER_IP}/24"),
            "dev",
            "m0",
        ]);
        mgr.run(&["ip", "link", "set", "m0", "up"]);
        Fabric { mgr, fab }
    }

    /// A host's namespace with `up0` cabled to the fabric's bridge.
    pub fn add_host(&self, tag: &str) -> Netns {
        let ns = Netns::new(tag);
        let peer = format!("v{tag}");
        sh(&format!(
            "ip -n {f} link add {peer} type veth peer name up0 netns {h}",
            f = self.fab.name,
            h = ns.name
        ));
        self.fab
            .run(&["ip", "link", "set", &peer, "master", "br0", "up"]);
        ns.run(&["ip", "link", "set", "up0", "up"]);
        ns
    }
}

/// The switch document of a host on the fabric: management on a host port
/// in `mgmt` (VLAN 10) at `ip`, the uplink a trunk with VLAN 10 native and
/// 30 tagged,
/// and `extra` TOML appended (more port groups, say).
pub fn host_switch_doc(ip: &str, extra: &str) -> String {
    format!(
        r#"[[port_group]]
name = "mgmt"
vlan = {MGMT_VLAN}

[[port_group]]
name = "trunk"
vlan_mode = "trunk"
native_vlan = {MGMT_VLAN}
allowed_vlans = [30]

[[uplink]]
name = "up"
interfaces = ["up0"]
port_group = "trunk"

[[host_port]]
name = "mgmt"
tap = "mgmt0"
port_group = "mgmt"
addresses = ["{ip}/24"]
{extra}"#
    )
}

/// A real `tandem-manager` in the fabric's manager namespace, with its
/// cluster made by `tandem cluster init`.
pub struct ManagerProc {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub netns: String,
    pub address: String,
    child: Option<Child>,
}

impl ManagerProc {
    pub fn start(netns: &Netns) -> ManagerProc {
        let dir = tempfile::Builder::new()
            .prefix("tandem-mgr-")
            .tempdir()
            .expect("tempdir");
        let state = dir.path().join("manager");
        let address = format!("{MANAGER_IP}:{MANAGER_PORT}");
        let out = Command::new(bin("tandem"))
            .args(["cluster", "init", "--name", "lab", "--state-dir"])
            .arg(&state)
            .args(["--listen", &address, "--advertise", &address])
            .output()
            .expect("tandem cluster init");
        assert!(
            out.status.success(),
            "cluster init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut m = ManagerProc {
            dir,
            state,
            netns: netns.name.clone(),
            address,
            child: None,
        };
        m.spawn();
        m
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("manager.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("manager log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(bin("tandem-manager"))
            .arg("--state-dir")
            .arg(&self.state)
            .env("TANDEM_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn tandem-manager");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.ok(&["cluster", "status"]).is_ok() {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("tandem-manager exited at start ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "tandem-manager did not answer within 20 s:\n{}",
                tail(&self.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it (SIGTERM, then SIGKILL after 15 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn operator(&self) -> PathBuf {
        self.state.join("operator")
    }

    /// `tandem ARGS` as the operator, inside the manager's namespace.
    pub fn tandem(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(bin("tandem"))
            .args(args)
            .arg("--identity")
            .arg(self.operator())
            .args(["--manager", &self.address])
            .stdin(Stdio::null())
            .output()
            .expect("run tandem")
    }

    /// `tandem --remote NAME@IP:PORT ARGS` as the operator: a host's API.
    pub fn remote(&self, host: &str, ip: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(bin("tandem"))
            .arg("--remote")
            .arg(format!("{host}@{ip}:{HOST_API_PORT}"))
            .arg("--remote-identity")
            .arg(self.operator())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tandem")
    }

    fn ok(&self, args: &[&str]) -> Result<String, String> {
        let out = self.tandem(args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "tandem {args:?} ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `tandem --json ARGS` as the operator, requiring success.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self
            .ok(&a)
            .unwrap_or_else(|e| panic!("{e}\nmanager log:\n{}", tail(&self.log(), 40)));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("tandem {args:?}: {e}: {out}"))
    }

    /// Joins a host: a token, then `tandem host join` from the host's
    /// namespace (through its switch) into `state_dir/identity`.
    pub fn join(&self, host_ns: &Netns, name: &str, state_dir: &Path) {
        let token = self.json(&["token", "create", "--host", name])["token"]
            .as_str()
            .expect("token")
            .to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", &host_ns.name])
            .arg(bin("tandem"))
            .args([
                "host",
                "join",
                &self.address,
                "--token",
                &token,
                "--name",
                name,
            ])
            .arg("--state-dir")
            .arg(state_dir)
            .stdin(Stdio::null())
            .output()
            .expect("tandem host join");
        assert!(
            out.status.success(),
            "host join {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for ManagerProc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- tandem-manager log (tail) ---\n{}",
                tail(&self.log(), 60)
            );
        }
    }
}

/// Waits until `f` gives `Some`, polling every 50 ms, for at most
/// `timeout`; panics with `what` and the last value seen otherwise.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
