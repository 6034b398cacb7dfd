//! Fan-out deployment on a real cluster: a real `tandem-manager` and four
//! real tandemds (`s`, `h1`, `h2`, `h3`) in network namespaces on the
//! management fabric (`harness::fabric`), and, apart from it, a full mesh
//! of shaped veth links between the four hosts that carries the images.
//!
//! ```text
//!   each host: data address 10.233.0.<n>/32 on lo (s 1, h1 2, h2 3, h3 4)
//!   each pair: veth to-<peer> ═ to-<host>, 10.232.<pair>.1/30 ═ .2/30,
//!              /32 routes to the peer's data address over that veth only
//!   each direction of the seed's matrix G3: tbf, rate ∝ 1 / time
//! ```
//!
//! Each host serves its own image directory (`--image-listen 0.0.0.0:7450
//! --image-advertise <data address>:7450`), so a network copy from one
//! host to another crosses exactly the veth between them, and the bytes
//! each veth sent say which copies the deployment made. One fabric, one
//! manager and four hosts serve every phase, in order.
//!
//! Needs root (namespaces, taps, AF_PACKET, tc).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::fabric::{host_switch_doc, wait_for, Fabric, ManagerProc, HOST_API_PORT};
use tandem_tests::{bin, serial_guard, sh, tail, Netns};

/// The image service's port on every host.
const IMAGE_PORT: u16 = 7450;
/// The template: this many random bytes.
const IMAGE_BYTES: u64 = 16 << 20;
/// The rate of a link whose time is 10; a link of time `t` gets
/// `10 / t` of it (16 MiB take about 2 s at 64 Mbit/s).
const RATE_AT_10_KBIT: f64 = 64_000.0;
/// The seed's matrix G3 (FIG 3A): one entry per directed direct link,
/// times in seconds here (the seed's are minutes). H2→H1 and H3→H1 are
/// the values the planner's golden tests assume (the seed gives none).
/// The links back to `s` are not in it and are left unshaped.
const G3: [(&str, &str, f64); 9] = [
    ("s", "h1", 10.0),
    ("s", "h2", 30.0),
    ("s", "h3", 45.0),
    ("h1", "h2", 10.0),
    ("h1", "h3", 15.0),
    ("h2", "h1", 10.0),
    ("h2", "h3", 5.0),
    ("h3", "h1", 15.0),
    ("h3", "h2", 5.0),
];
/// Bytes a veth may send in a phase that moves no image (IPv6 neighbour
/// discovery and the like).
const NOISE_BYTES: u64 = 64 << 10;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A tandemd in a namespace with its own state, socket, RAM and image
/// directories. (The harness's `Daemon` always passes the shared guest
/// image directory as `--image-dir`, and tandemd takes the option once;
/// a deployment needs one image directory per host.)
struct Tandemd {
    dir: tempfile::TempDir,
    state_dir: PathBuf,
    socket: PathBuf,
    ram_dir: PathBuf,
    images: PathBuf,
    netns: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl Tandemd {
    fn start(netns: &str, args: &[&str]) -> Tandemd {
        let dir = tempfile::Builder::new()
            .prefix("tandem-deploy-")
            .tempdir()
            .expect("tempdir");
        let images = dir.path().join("images");
        std::fs::create_dir(&images).expect("image dir");
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut d = Tandemd {
            state_dir: dir.path().join("state"),
            socket: dir.path().join("tandemd.sock"),
            ram_dir: PathBuf::from(format!("/dev/shm/tandem-deploy-{}-{n}", std::process::id())),
            images,
            dir,
            netns: netns.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        d.spawn();
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tandemd.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tandemd.log"))
            .expect("daemon log");
        // `ip netns exec` execs tandemd in place: the child's pid is
        // tandemd's.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(bin("tandemd"))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--ram-dir")
            .arg(&self.ram_dir)
            .arg("--image-dir")
            .arg(&self.images)
            .args(&self.args)
            .env("TANDEM_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn tandemd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("tandemd exited at start ({st}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "tandemd did not listen within 20 s:\n{}",
                tail(&self.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGTERM, then SIGKILL after 15 s.
    fn stop(&mut self) {
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

    /// SIGKILL: the host's daemon dies at once, its connections with it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it and starts a new one on the same state with `args`.
    fn restart(&mut self, args: &[&str]) {
        self.stop();
        self.args = args.iter().map(|s| s.to_string()).collect();
        self.spawn();
    }
}

impl Drop for Tandemd {
    fn drop(&mut self) {
        // The clones' VMs go with the test: destroyed through this
        // tandemd while it runs.
        if self.child.is_some() {
            if let Ok(out) = Command::new(bin("tandem"))
                .arg("--socket")
                .arg(&self.socket)
                .args(["--json", "vm", "list"])
                .output()
            {
                if let Ok(Value::Array(vms)) = serde_json::from_slice::<Value>(&out.stdout) {
                    for vm in vms {
                        if let Some(name) = vm["name"].as_str() {
                            let _ = Command::new(bin("tandem"))
                                .arg("--socket")
                                .arg(&self.socket)
                                .args(["vm", "destroy", name])
                                .output();
                        }
                    }
                }
            }
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.ram_dir);
        if std::thread::panicking() {
            eprintln!(
                "--- tandemd {} log (tail) ---\n{}",
                self.netns,
                tail(&self.log(), 40)
            );
        }
    }
}

struct Host {
    name: &'static str,
    /// Its data address is 10.233.0.<n>.
    n: u8,
    mgmt_ip: String,
    /// Dropped before its namespace.
    daemon: Tandemd,
    ns: Netns,
    doc: PathBuf,
    _docs: tempfile::TempDir,
}

impl Host {
    fn start(fabric: &Fabric, name: &'static str, tag: &str, n: u8) -> Host {
        let ns = fabric.add_host(tag);
        let mgmt_ip = format!("10.231.0.{}", 30 + n);
        let docs = tempfile::tempdir().unwrap();
        let doc = docs.path().join("switch.toml");
        std::fs::write(&doc, host_switch_doc(&mgmt_ip, "")).unwrap();
        let daemon = Tandemd::start(&ns.name, &["--switch-config", doc.to_str().unwrap()]);
        Host {
            name,
            n,
            mgmt_ip,
            daemon,
            ns,
            doc,
            _docs: docs,
        }
    }

    fn data_ip(&self) -> String {
        format!("10.233.0.{}", self.n)
    }

    fn image_service(&self) -> String {
        format!("{}:{IMAGE_PORT}", self.data_ip())
    }

    /// Restarts tandemd with the identity the join wrote, the host API and
    /// the image service on its data address.
    fn serve(&mut self) {
        let api = format!("0.0.0.0:{HOST_API_PORT}");
        let api_adv = format!("{}:{HOST_API_PORT}", self.mgmt_ip);
        let images = format!("0.0.0.0:{IMAGE_PORT}");
        let images_adv = self.image_service();
        let doc = self.doc.to_str().unwrap().to_string();
        self.daemon.restart(&[
            "--switch-config",
            &doc,
            "--host-api",
            &api,
            "--host-api-advertise",
            &api_adv,
            "--image-listen",
            &images,
            "--image-advertise",
            &images_adv,
        ]);
    }

    /// Bytes sent so far on its veth towards `peer`.
    fn tx_bytes(&self, peer: &str) -> u64 {
        let dev = format!("to-{peer}");
        self.ns
            .run(&["cat", &format!("/sys/class/net/{dev}/statistics/tx_bytes")])
            .trim()
            .parse()
            .expect("tx_bytes")
    }
}

fn host<'a>(hosts: &'a [Host], name: &str) -> &'a Host {
    hosts.iter().find(|h| h.name == name).expect("a host")
}

/// The full mesh: a veth pair per pair of hosts with its own /30, each
/// host's data address on lo, /32 routes to the others' data addresses
/// over the direct veth, and each direction of G3 shaped by tbf.
fn build_mesh(hosts: &[Host]) {
    for h in hosts {
        h.ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/32", h.data_ip()),
            "dev",
            "lo",
        ]);
    }
    let mut pair = 0;
    for (i, a) in hosts.iter().enumerate() {
        for b in &hosts[i + 1..] {
            pair += 1;
            let (a_dev, b_dev) = (format!("to-{}", b.name), format!("to-{}", a.name));
            sh(&format!(
                "ip -n {} link add {a_dev} type veth peer name {b_dev} netns {}",
                a.ns.name, b.ns.name
            ));
            for (h, dev, me, peer, peer_ip) in [(a, &a_dev, 1, b, 2), (b, &b_dev, 2, a, 1)] {
                h.ns.run(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.232.{pair}.{me}/30"),
                    "dev",
                    dev,
                ]);
                h.ns.run(&["ip", "link", "set", dev, "up"]);
                h.ns.run(&[
                    "ip",
                    "route",
                    "add",
                    &format!("{}/32", peer.data_ip()),
                    "via",
                    &format!("10.232.{pair}.{peer_ip}"),
                    "dev",
                    dev,
                    "src",
                    &h.data_ip(),
                ]);
            }
        }
    }
    for (from, to, time) in G3 {
        let kbit = (RATE_AT_10_KBIT * 10.0 / time).round() as u64;
        host(hosts, from).ns.run(&[
            "tc",
            "qdisc",
            "add",
            "dev",
            &format!("to-{to}"),
            "root",
            "tbf",
            "rate",
            &format!("{kbit}kbit"),
            "burst",
            "64kb",
            "latency",
            "100ms",
        ]);
    }
}

/// Every host reaches every other host's data address, over the veth
/// between the two.
fn check_mesh(hosts: &[Host]) {
    for a in hosts {
        for b in hosts.iter().filter(|b| b.name != a.name) {
            let route = a.ns.run(&["ip", "route", "get", &b.data_ip()]);
            assert!(
                route.contains(&format!("dev to-{} ", b.name))
                    && route.contains(&format!("src {} ", a.data_ip())),
                "{} -> {}: {route}",
                a.name,
                b.name
            );
            wait_for(
                &format!("{} pings {}'s data address", a.name, b.name),
                Duration::from_secs(10),
                || {
                    Command::new("ip")
                        .args(["netns", "exec", &a.ns.name])
                        .args(["ping", "-c", "1", "-W", "1", &b.data_ip()])
                        .output()
                        .expect("ping")
                        .status
                        .success()
                        .then_some(())
                },
            );
        }
    }
}

/// Bytes sent so far on every directed link of the mesh, by (from, to).
fn link_bytes(hosts: &[Host]) -> BTreeMap<(String, String), u64> {
    let mut m = BTreeMap::new();
    for a in hosts {
        for b in hosts.iter().filter(|b| b.name != a.name) {
            m.insert((a.name.to_string(), b.name.to_string()), a.tx_bytes(b.name));
        }
    }
    m
}

/// Bytes each directed link sent between two readings.
fn link_delta(
    before: &BTreeMap<(String, String), u64>,
    after: &BTreeMap<(String, String), u64>,
) -> BTreeMap<(String, String), u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before[k]))
        .collect()
}

fn delta_of(d: &BTreeMap<(String, String), u64>, from: &str, to: &str) -> u64 {
    d[&(from.to_string(), to.to_string())]
}

/// Every file under `dir`, by path relative to it.
fn files(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).expect("read image dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Every host's image directory listing, by host name.
fn all_files(hosts: &[Host]) -> BTreeMap<&'static str, BTreeSet<String>> {
    hosts
        .iter()
        .map(|h| (h.name, files(&h.daemon.images)))
        .collect()
}

/// `tmpl-NN.img`: a copy of the template, by its default name.
fn is_copy(name: &str) -> bool {
    name.strip_prefix("tmpl-")
        .and_then(|r| r.strip_suffix(".img"))
        .is_some_and(|nn| nn.len() == 2 && nn.bytes().all(|b| b.is_ascii_digit()))
}

fn sha256(path: &Path) -> String {
    let out = sh(&format!("sha256sum '{}'", path.display()));
    out.split_whitespace().next().expect("digest").to_string()
}

fn text(o: &Output) -> String {
    format!(
        "exit {}:\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `tandem ARGS` as the operator in the manager's namespace (as
/// `ManagerProc::tandem`), killed and failed after `timeout`.
fn tandem(m: &ManagerProc, args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &m.netns])
        .arg(bin("tandem"))
        .args(args)
        .arg("--identity")
        .arg(m.operator())
        .args(["--manager", &m.address])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tandem");
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait tandem") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tandem {args:?} did not finish within {timeout:?}:\nstdout: {}\nstderr: {}\nmanager log:\n{}",
                String::from_utf8_lossy(&out.join().unwrap_or_default()),
                String::from_utf8_lossy(&err.join().unwrap_or_default()),
                tail(&m.log(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().expect("stdout"),
        stderr: err.join().expect("stderr"),
    }
}

/// Reads `r` to its end on a thread.
fn drain<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// The `seconds` of link `from → to` in a dry run's `links`.
fn link_seconds(view: &Value, from: &str, to: &str) -> f64 {
    view["links"]
        .as_array()
        .unwrap_or_else(|| panic!("no links array: {view:#}"))
        .iter()
        .find(|l| l["from"] == from && l["to"] == to)
        .and_then(|l| l["seconds"].as_f64())
        .unwrap_or_else(|| panic!("no {from} -> {to} in links: {view:#}"))
}

/// Reshapes every directed link between the hosts to `times` (the time of
/// one image, as G3's; a link of time `t` gets `10 / t` of
/// [`RATE_AT_10_KBIT`]).
fn reshape(hosts: &[Host], times: &[(&str, &str, f64)]) {
    for (from, to, time) in times {
        let kbit = (RATE_AT_10_KBIT * 10.0 / time).round() as u64;
        host(hosts, from).ns.run(&[
            "tc",
            "qdisc",
            "replace",
            "dev",
            &format!("to-{to}"),
            "root",
            "tbf",
            "rate",
            &format!("{kbit}kbit"),
            "burst",
            "64kb",
            "latency",
            "100ms",
        ]);
    }
}

/// Writes a links file of `times` into `dir` as `name`.
fn links_file(dir: &Path, name: &str, times: &[(&str, &str, f64)]) -> String {
    let mut doc = String::new();
    for (from, to, seconds) in times {
        doc.push_str(&format!(
            "[[link]]\nfrom = \"{from}\"\nto = \"{to}\"\nseconds = {seconds:.1}\n\n"
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, doc).unwrap();
    path.to_str().unwrap().to_string()
}

/// `tandem ARGS` started as the operator, its stderr lines sent to the
/// returned channel as they come, so that the test can act on the
/// deployment's events.
struct Running {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    seen: Vec<String>,
}

impl Running {
    fn start(m: &ManagerProc, args: &[&str]) -> Running {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &m.netns])
            .arg(bin("tandem"))
            .args(args)
            .arg("--identity")
            .arg(m.operator())
            .args(["--manager", &m.address])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tandem");
        let stdout = drain(child.stdout.take().expect("stdout"));
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            stdout,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line with every one of `words`.
    fn wait_line(&mut self, words: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if words.iter().all(|w| l.contains(w)) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line with {words:?} within {timeout:?}; seen:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the command to end; its status, stdout and the rest of
    /// stderr.
    fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait tandem") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "tandem did not finish within {timeout:?}; stderr:\n{}",
                    self.seen.join("\n")
                );
            }
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = String::from_utf8_lossy(&self.stdout.join().unwrap_or_default()).into_owned();
        // The reader thread ends with the pipe.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        (status, out, self.seen.join("\n"))
    }
}

/// The seed's G10 (FIG 10, times assumed by the planner's golden tests):
/// direct links from S win (15 < 10 + 10), H1 finishes first.
const G10: [(&str, &str, f64); 9] = [
    ("s", "h1", 10.0),
    ("s", "h2", 15.0),
    ("s", "h3", 15.0),
    ("h1", "h2", 10.0),
    ("h1", "h3", 10.0),
    ("h2", "h1", 10.0),
    ("h2", "h3", 10.0),
    ("h3", "h1", 10.0),
    ("h3", "h2", 10.0),
];

/// G10 with the links between targets at 40 on paper: S's direct copies
/// to H2 and H3 are then kept even when their progress shows them slow
/// (through H1 would take longer still), so they are still needed, and
/// running, when S dies.
const G10_SLOW_PEERS: [(&str, &str, f64); 9] = [
    ("s", "h1", 10.0),
    ("s", "h2", 15.0),
    ("s", "h3", 15.0),
    ("h1", "h2", 40.0),
    ("h1", "h3", 40.0),
    ("h2", "h1", 40.0),
    ("h2", "h3", 40.0),
    ("h3", "h1", 40.0),
    ("h3", "h2", 40.0),
];

/// G10 as shaped: S's links to H2 and H3 throttled to a tenth of the
/// plan's rate, so that their copies are still running when S dies.
const G10_SHAPED: [(&str, &str, f64); 9] = [
    ("s", "h1", 10.0),
    ("s", "h2", 150.0),
    ("s", "h3", 150.0),
    ("h1", "h2", 10.0),
    ("h1", "h3", 10.0),
    ("h2", "h1", 10.0),
    ("h2", "h3", 10.0),
    ("h3", "h1", 10.0),
    ("h3", "h2", 10.0),
];

/// Each of `targets` holds exactly one copy named `<prefix>-…`, with the
/// template's SHA-256.
fn one_verified_copy_each(hosts: &[Host], targets: &[&str], prefix: &str, digest: &str) {
    for to in targets {
        let h = host(hosts, to);
        let copies: Vec<String> = files(&h.daemon.images)
            .into_iter()
            .filter(|f| f.starts_with(&format!("{prefix}-")))
            .collect();
        assert_eq!(copies.len(), 1, "{to}: {copies:?}");
        assert_eq!(sha256(&h.daemon.images.join(&copies[0])), digest, "{to}");
    }
}

fn partials(hosts: &[Host]) -> Vec<String> {
    all_files(hosts)
        .into_iter()
        .flat_map(|(h, files)| {
            files
                .into_iter()
                .filter(|f| f.ends_with(".partial"))
                .map(move |f| format!("{h}:{f}"))
        })
        .collect()
}

#[test]
fn fan_out_deployment_over_a_shaped_mesh() {
    let _g = serial_guard();
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());
    let fabric = Fabric::new("dp");
    let mut manager = ManagerProc::start(&fabric.mgr);
    let mut hosts = vec![
        Host::start(&fabric, "s", "dps", 1),
        Host::start(&fabric, "h1", "dp1", 2),
        Host::start(&fabric, "h2", "dp2", 3),
        Host::start(&fabric, "h3", "dp3", 4),
    ];
    let image = IMAGE_BYTES as f64;

    phase("the mesh: veths, data addresses, routes, G3 shaping");
    build_mesh(&hosts);
    check_mesh(&hosts);
    // The shaping is in place on every link of G3 (rates are timing: the
    // measurement phase ranks them with margins of 3x and more).
    for (from, to, _) in G3 {
        let q = host(&hosts, from)
            .ns
            .run(&["tc", "qdisc", "show", "dev", &format!("to-{to}")]);
        assert!(q.contains("tbf"), "{from} -> {to} is not shaped: {q}");
    }

    phase("join the hosts; serve the host API and the image service");
    for h in hosts.iter_mut() {
        manager.join(&h.ns, h.name, &h.daemon.state_dir);
        h.serve();
    }
    for h in &hosts {
        let api = format!("{}:{HOST_API_PORT}", h.mgmt_ip);
        let service = h.image_service();
        wait_for(
            &format!("{} online, with its host API and image service", h.name),
            Duration::from_secs(30),
            || {
                let v = manager.json(&["host", "show", h.name]);
                (v["connection"] == "online"
                    && v["host_api"] == api.as_str()
                    && v.to_string().contains(&format!("\"{service}\"")))
                .then_some(())
            },
        );
        let addr: SocketAddr = service.parse().unwrap();
        wait_for(
            &format!("{}'s image service accepts", h.name),
            Duration::from_secs(10),
            || {
                h.ns.within(move || {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
                })
                .then_some(())
            },
        );
    }

    let work = tempfile::tempdir().unwrap();
    let links = work.path().join("g3.toml");
    let mut doc = String::new();
    for (from, to, seconds) in G3 {
        doc.push_str(&format!(
            "[[link]]\nfrom = \"{from}\"\nto = \"{to}\"\nseconds = {seconds:.1}\n\n"
        ));
    }
    std::fs::write(&links, doc).unwrap();
    let links = links.to_str().unwrap().to_string();
    let s = host(&hosts, "s");
    let template = s.daemon.images.join("tmpl.img");
    {
        let mut bytes = vec![0u8; IMAGE_BYTES as usize];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .expect("random bytes");
        std::fs::write(&template, bytes).expect("write the template");
    }
    let digest = sha256(&template);
    let targets = ["h1", "h2", "h3"];

    phase("D-E1: deploy 3 copies per host over G3; copies go s->h1, h1->h2, h1->h3");
    let before = link_bytes(&hosts);
    let out = tandem(
        &manager,
        &[
            "--json",
            "deploy",
            "tmpl.img",
            "--from",
            "s",
            "--hosts",
            "h1,h2,h3",
            "--per-host",
            "3",
            "--links",
            &links,
        ],
        Duration::from_secs(60),
    );
    let moved = link_delta(&before, &link_bytes(&hosts));
    assert!(out.status.success(), "deploy: {}", text(&out));
    let view: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("deploy printed no JSON object ({e}): {}", text(&out)));
    assert_eq!(view["state"], "done", "{view:#}");
    let listing = all_files(&hosts);
    let mut names = BTreeSet::new();
    for (name, files) in &listing {
        assert!(
            !files.iter().any(|f| f.contains(".partial")),
            "{name}: a partial file is left: {files:?}"
        );
    }
    assert!(
        listing["s"].contains("tmpl.img") && !listing["s"].iter().any(|f| is_copy(f)),
        "s is the source, not a target: {:?}",
        listing["s"]
    );
    assert_eq!(sha256(&template), digest, "the template is left as it was");
    for t in targets {
        let copies: Vec<&String> = listing[t].iter().filter(|f| is_copy(f)).collect();
        assert_eq!(copies.len(), 3, "{t}: {:?}", listing[t]);
        for c in copies {
            assert_eq!(
                sha256(&host(&hosts, t).daemon.images.join(c)),
                digest,
                "{t}: {c}"
            );
            assert!(names.insert(c.clone()), "{c} on two hosts");
        }
    }
    let want: BTreeSet<String> = (1..=9).map(|i| format!("tmpl-{i:02}.img")).collect();
    assert_eq!(names, want, "numbered from 01 across the deployment");
    eprintln!("  bytes sent per link: {moved:?}");
    for (from, to) in [("s", "h1"), ("h1", "h2"), ("h1", "h3")] {
        let images = delta_of(&moved, from, to) as f64 / image;
        assert!(
            (0.95..=1.15).contains(&images),
            "{from} -> {to} carried {images:.3} images, one expected; all links: {moved:?}"
        );
    }
    for (from, to) in [("s", "h2"), ("s", "h3"), ("h2", "h3"), ("h3", "h2")] {
        let images = delta_of(&moved, from, to) as f64 / image;
        assert!(
            images < 0.05,
            "{from} -> {to} carried {images:.3} images, none expected; all links: {moved:?}"
        );
    }

    phase("clones: two VMs from one deployed disk boot on h1's switch and reach each other");
    std::fs::copy(
        tandem_tests::image_dir().join("data.qcow2"),
        s.daemon.images.join("guest.qcow2"),
    )
    .expect("the guest's data disk as a template");
    let spec = work.path().join("clone.toml");
    let img = tandem_tests::image_dir();
    std::fs::write(
        &spec,
        format!(
            r#"name = "{{name}}"
memory_mib = 128
accelerator = "tcg"
shutdown_timeout_s = 10

[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 loglevel=4 tandem.ip={{ip}}"

[[disks]]
name = "data"
path = "{{disk}}"

[[nics]]
name = "eth0"
mac = "{{mac}}"
backend = "switch"
port_group = "mgmt"
"#,
            kernel = img.join("vmlinux").display(),
            initrd = img.join("initrd.img").display(),
        ),
    )
    .unwrap();
    let out = tandem(
        &manager,
        &[
            "--json",
            "deploy",
            "guest.qcow2",
            "--from",
            "s",
            "--hosts",
            "h1",
            "--per-host",
            "2",
            "--links",
            &links,
            "--vm-spec",
            spec.to_str().unwrap(),
            "--addresses",
            "10.231.0.61/24",
            "--start",
        ],
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "clones: {}", text(&out));
    let view: Value = serde_json::from_slice(&out.stdout).expect("the clones' view");
    let vms = view["vms"].as_array().expect("vms").clone();
    assert_eq!(vms.len(), 2, "{view:#}");
    for field in ["name", "uuid", "mac", "ip", "disk"] {
        assert_ne!(
            vms[0][field], vms[1][field],
            "clones share their {field}: {view:#}"
        );
    }
    assert!(vms
        .iter()
        .all(|v| v["host"] == "h1" && v["started"] == true));
    let h1 = host(&hosts, "h1");
    let reply = wait_for(
        "clone 1 reaches clone 2 through h1's switch",
        Duration::from_secs(120),
        || {
            h1.ns
                .within(|| {
                    tandem_tests::request(
                        "10.231.0.61:7070",
                        "DIAL 10.231.0.62:7070 PING",
                        Duration::from_secs(3),
                    )
                })
                .ok()
                .filter(|r| r.starts_with("DIALED"))
        },
    );
    eprintln!("  clone 1 asked clone 2: {reply}");
    // A second deployment of the same names is refused before it copies.
    let again = tandem(
        &manager,
        &[
            "deploy",
            "guest.qcow2",
            "--from",
            "s",
            "--hosts",
            "h2",
            "--per-host",
            "1",
            "--links",
            &links,
            "--vm-spec",
            spec.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(
        !again.status.success(),
        "a spec without an address for {{ip}}: {}",
        text(&again)
    );

    phase("--dry-run: the plan, and nothing copied");
    let files_before = all_files(&hosts);
    let before = link_bytes(&hosts);
    let dry = [
        "deploy",
        "tmpl.img",
        "--from",
        "s",
        "--hosts",
        "h1,h2,h3",
        "--per-host",
        "3",
        "--links",
        &links,
        "--name-prefix",
        "plan",
        "--dry-run",
    ];
    let out = tandem(&manager, &dry, Duration::from_secs(30));
    assert!(out.status.success(), "dry run: {}", text(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("network copy s") && plan.contains("h1"),
        "the plan: {plan}"
    );
    let mut dry_json = vec!["--json"];
    dry_json.extend_from_slice(&dry);
    let out = tandem(&manager, &dry_json, Duration::from_secs(30));
    assert!(out.status.success(), "dry run --json: {}", text(&out));
    let view: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("dry run printed no JSON object ({e}): {}", text(&out)));
    assert!(!view["plan"].is_null(), "{view:#}");
    for (from, to, seconds) in G3 {
        let got = link_seconds(&view, from, to);
        assert!(
            (got - seconds).abs() < 1e-6,
            "{from} -> {to}: {got}, injected {seconds}"
        );
    }
    let moved = link_delta(&before, &link_bytes(&hosts));
    assert!(
        moved.values().all(|b| *b < NOISE_BYTES),
        "a dry run moved bytes: {moved:?}"
    );
    assert_eq!(all_files(&hosts), files_before, "a dry run copied");

    phase("bad input: a missing template, --per-host 0");
    let out = tandem(
        &manager,
        &[
            "deploy",
            "nosuch.img",
            "--from",
            "s",
            "--hosts",
            "h1,h2,h3",
            "--per-host",
            "3",
            "--links",
            &links,
        ],
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nosuch.img"),
        "a missing template: {}",
        text(&out)
    );
    let out = tandem(
        &manager,
        &[
            "deploy",
            "tmpl.img",
            "--from",
            "s",
            "--hosts",
            "h1,h2,h3",
            "--per-host",
            "0",
            "--links",
            &links,
        ],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success()
            && (err.contains("per-host") || err.contains("per_host") || err.contains("per host")),
        "--per-host 0: {}",
        text(&out)
    );
    // The clones of D-E1 are there: the same names again are refused
    // before anything moves, never overwritten.
    let out = tandem(
        &manager,
        &[
            "deploy",
            "tmpl.img",
            "--from",
            "s",
            "--hosts",
            "h1,h2,h3",
            "--per-host",
            "3",
            "--links",
            &links,
        ],
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already has"),
        "clone names in use: {}",
        text(&out)
    );
    assert_eq!(
        all_files(&hosts),
        files_before,
        "a refused deployment copied"
    );

    phase("measurement: a dry run without --links probes the links");
    let out = tandem(
        &manager,
        &[
            "--json",
            "deploy",
            "tmpl.img",
            "--from",
            "s",
            "--hosts",
            "h1,h2,h3",
            "--per-host",
            "3",
            "--name-prefix",
            "probe",
            "--dry-run",
        ],
        Duration::from_secs(90),
    );
    assert!(out.status.success(), "probing dry run: {}", text(&out));
    let view: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("dry run printed no JSON object ({e}): {}", text(&out)));
    for (from, to, _) in G3 {
        let secs = link_seconds(&view, from, to);
        assert!(secs.is_finite() && secs > 0.0, "{from} -> {to}: {secs}");
    }
    let (s_h1, s_h3) = (
        link_seconds(&view, "s", "h1"),
        link_seconds(&view, "s", "h3"),
    );
    let (h2_h3, h1_h3) = (
        link_seconds(&view, "h2", "h3"),
        link_seconds(&view, "h1", "h3"),
    );
    eprintln!("  measured: s->h1 {s_h1}, s->h3 {s_h3}, h2->h3 {h2_h3}, h1->h3 {h1_h3}");
    assert!(s_h1 < s_h3, "s->h1 {s_h1} s, s->h3 {s_h3} s: {view:#}");
    assert!(
        h2_h3 < h1_h3,
        "h2->h3 {h2_h3} s, h1->h3 {h1_h3} s: {view:#}"
    );
    assert_eq!(all_files(&hosts), files_before, "a probing dry run copied");

    phase("D-E3: h1 -> h2 cut mid-copy: no partial left, h2's copy arrives through h3");
    let before = link_bytes(&hosts);
    let mut run = Running::start(
        &manager,
        &[
            "--json",
            "deploy",
            "tmpl.img",
            "--from",
            "s",
            "--hosts",
            "h1,h2,h3",
            "--per-host",
            "1",
            "--links",
            &links,
            "--name-prefix",
            "e3",
        ],
    );
    let line = run.wait_line(&["network copy h1 -> h2: "], Duration::from_secs(30));
    let file = line
        .rsplit(": ")
        .next()
        .expect("the copy's file")
        .trim()
        .to_string();
    let partial = host(&hosts, "h2")
        .daemon
        .images
        .join(format!("{file}.partial"));
    // The cut fires on the copy's own progress: half the image on h2.
    wait_for("h1 -> h2 half done", Duration::from_secs(30), || {
        std::fs::metadata(&partial)
            .ok()
            .filter(|m| m.len() >= IMAGE_BYTES / 2)
            .map(|_| ())
    });
    // The cut: h2 resets every connection with h1's image service, both
    // ways (its own socket sees the reset at its next acknowledgement).
    let h2 = host(&hosts, "h2");
    h2.ns.run(&["nft", "add", "table", "inet", "dpcut"]);
    h2.ns.run(&[
        "nft",
        "add chain inet dpcut in { type filter hook input priority 0 ; }",
    ]);
    h2.ns.run(&[
        "nft",
        "add chain inet dpcut out { type filter hook output priority 0 ; }",
    ]);
    h2.ns.run(&[
        "nft",
        &format!(
            "add rule inet dpcut out ip daddr {} tcp dport {IMAGE_PORT} reject with tcp reset",
            host(&hosts, "h1").data_ip()
        ),
    ]);
    h2.ns.run(&[
        "nft",
        &format!(
            "add rule inet dpcut in ip saddr {} tcp sport {IMAGE_PORT} reject with tcp reset",
            host(&hosts, "h1").data_ip()
        ),
    ]);
    let (status, out, err) = run.finish(Duration::from_secs(90));
    h2.ns.run(&["nft", "delete", "table", "inet", "dpcut"]);
    assert!(status.success(), "D-E3 ({status}): {err}");
    let view: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("D-E3 printed no JSON ({e}): {out}"));
    assert_eq!(view["state"], "done", "{view:#}");
    assert!(
        err.contains("the link h1 -> h2 is taken out of the plan"),
        "the cut is not reported: {err}"
    );
    one_verified_copy_each(&hosts, &targets, "e3", &digest);
    assert!(
        partials(&hosts).is_empty(),
        "partials left: {:?}",
        partials(&hosts)
    );
    let moved = link_delta(&before, &link_bytes(&hosts));
    let via_h3 = delta_of(&moved, "h3", "h2") as f64 / image;
    assert!(
        (0.95..=1.15).contains(&via_h3),
        "h3 -> h2 carried {via_h3:.3} images; h2's copy should come through h3: {moved:?}"
    );

    phase(
        "manager restart mid-copy: the new manager resumes the deployment; nothing is sent twice",
    );
    // s -> h1 slowed so that the copy runs across the restart.
    reshape(&hosts, &[("s", "h1", 50.0)]);
    let before = link_bytes(&hosts);
    let mut run = Running::start(
        &manager,
        &[
            "--json",
            "deploy",
            "tmpl.img",
            "--from",
            "s",
            "--hosts",
            "h1,h2,h3",
            "--per-host",
            "1",
            "--links",
            &links,
            "--name-prefix",
            "r",
        ],
    );
    run.wait_line(&["network copy s -> h1"], Duration::from_secs(30));
    manager.restart();
    let (status, out, err) = run.finish(Duration::from_secs(120));
    assert!(status.success(), "across the restart ({status}): {err}");
    let view: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("no JSON view after the restart ({e}): {out}"));
    assert_eq!(view["state"], "done", "{view:#}");
    assert!(
        view["log"].as_array().is_some_and(|l| l
            .iter()
            .any(|x| x.as_str().is_some_and(|x| x.contains("resumed")))),
        "the new manager did not say it resumed: {view:#}"
    );
    one_verified_copy_each(&hosts, &targets, "r", &digest);
    assert!(
        partials(&hosts).is_empty(),
        "partials left: {:?}",
        partials(&hosts)
    );
    let moved = link_delta(&before, &link_bytes(&hosts));
    let s_h1 = delta_of(&moved, "s", "h1") as f64 / image;
    assert!(
        (0.95..=1.15).contains(&s_h1),
        "s -> h1 carried {s_h1:.3} images across the restart (the copy went on, not again): {moved:?}"
    );

    phase("D-E5: the source dies before any copy completes: a clear failure, no partials");
    reshape(
        &hosts,
        &[("s", "h1", 150.0), ("s", "h2", 150.0), ("s", "h3", 150.0)],
    );
    let g10 = links_file(work.path(), "g10.toml", &G10);
    let files_before = all_files(&hosts);
    let mut run = Running::start(
        &manager,
        &[
            "deploy",
            "tmpl.img",
            "--from",
            "s",
            "--hosts",
            "h1,h2,h3",
            "--per-host",
            "1",
            "--links",
            &g10,
            "--name-prefix",
            "e5",
        ],
    );
    for to in targets {
        run.wait_line(&["network copy s -> ", to], Duration::from_secs(30));
    }
    // The copies take about 20 s at these rates: none completes first.
    hosts
        .iter_mut()
        .find(|h| h.name == "s")
        .unwrap()
        .daemon
        .kill();
    let (status, _, err) = run.finish(Duration::from_secs(60));
    assert!(
        !status.success() && err.contains("no live host holds a complete copy"),
        "D-E5 ({status}): {err}"
    );
    assert!(
        partials(&hosts).is_empty(),
        "partials left: {:?}",
        partials(&hosts)
    );
    let mut now = all_files(&hosts);
    now.remove("s");
    let mut was = files_before.clone();
    was.remove("s");
    assert_eq!(now, was, "D-E5 left files behind");

    phase("D-E4: the source dies after H1 completes: H1 serves H2 and H3, partials removed");
    hosts.iter_mut().find(|h| h.name == "s").unwrap().serve();
    {
        let s = host(&hosts, "s");
        let addr: SocketAddr = s.image_service().parse().unwrap();
        wait_for("s's image service back", Duration::from_secs(20), || {
            s.ns.within(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
                .then_some(())
        });
    }
    reshape(&hosts, &G10_SHAPED);
    let g10_slow_peers = links_file(work.path(), "g10-slow-peers.toml", &G10_SLOW_PEERS);
    let before = link_bytes(&hosts);
    let mut run = Running::start(
        &manager,
        &[
            "--json",
            "deploy",
            "tmpl.img",
            "--from",
            "s",
            "--hosts",
            "h1,h2,h3",
            "--per-host",
            "1",
            "--links",
            &g10_slow_peers,
            "--name-prefix",
            "e4",
        ],
    );
    run.wait_line(&["h1: e4-", "verified"], Duration::from_secs(60));
    hosts
        .iter_mut()
        .find(|h| h.name == "s")
        .unwrap()
        .daemon
        .kill();
    let (status, out, err) = run.finish(Duration::from_secs(90));
    assert!(status.success(), "D-E4 ({status}): {err}");
    let view: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("D-E4 printed no JSON ({e}): {out}"));
    assert_eq!(view["state"], "done", "{view:#}");
    one_verified_copy_each(&hosts, &targets, "e4", &digest);
    assert!(
        partials(&hosts).is_empty(),
        "partials left: {:?}",
        partials(&hosts)
    );
    let moved = link_delta(&before, &link_bytes(&hosts));
    for to in ["h2", "h3"] {
        let images = delta_of(&moved, "h1", to) as f64 / image;
        assert!(
            (0.95..=1.15).contains(&images),
            "h1 -> {to} carried {images:.3} images after s died; all links: {moved:?}"
        );
    }
    assert!(
        err.contains("s does not answer"),
        "the source's death is reported: {err}"
    );
    phase("done");
}
