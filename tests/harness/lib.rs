//! Harness for tandem's end-to-end tests: real tandemd processes with
//! private state directories, the real `tandem` CLI, real QEMU guests built by
//! `images/build.sh`.
//!
//! Tests that boot guests take [`serial_guard`] so only one runs at a time
//! across all test binaries (two cores are not enough for more under TCG).
//! Everything a test starts is torn down by `Drop`, on success and on panic.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// The readiness line the guest service prints.
pub const READY: &str = "TANDEM-GUEST-READY";

/// Path of a binary of this workspace (built by `cargo build --workspace --all-targets`, which also turns on the tests' `fault-injection` hooks).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace --all-targets`, which also enables the fault-injection hooks the tests use; ci/test.sh does it)",
        p.display()
    );
    p
}

/// The guest image directory; panics with the fix when images are missing.
pub fn image_dir() -> PathBuf {
    let dir = std::env::var_os("TANDEM_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/tandem/images"));
    for f in ["vmlinux", "initrd.img", "data.qcow2"] {
        assert!(
            dir.join(f).is_file(),
            "guest image file {} is missing: run `bash images/build.sh` (ci/test.sh does it)",
            dir.join(f).display()
        );
    }
    dir
}

/// Serialises guest-booting tests across test binaries with an flock.
pub struct SerialGuard {
    _lock: std::fs::File,
}

pub fn serial_guard() -> SerialGuard {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/tandem-e2e.lock")
        .expect("open lock file");
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; blocking until the lock is free.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock failed");
    SerialGuard { _lock: f }
}

pub mod fabric;

static DAEMON_SEQ: AtomicU32 = AtomicU32::new(0);

/// A tandemd with its own state directory, socket and RAM directory.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub ram_dir: PathBuf,
    extra_args: Vec<String>,
    /// Network namespace tandemd runs in (its uplinks and taps live there).
    netns: Option<String>,
    child: Option<Child>,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_in(None, extra_args)
    }

    /// Starts a daemon whose state directory is `state_dir` (e.g. a small
    /// file system the test mounted) instead of one in its temp dir.
    pub fn start_in(state_dir: Option<PathBuf>, extra_args: &[&str]) -> Self {
        Self::start_full(state_dir, None, extra_args)
    }

    /// Starts a daemon inside network namespace `netns`.
    pub fn start_in_netns(netns: &str, extra_args: &[&str]) -> Self {
        Self::start_full(None, Some(netns.to_string()), extra_args)
    }

    fn start_full(state_dir: Option<PathBuf>, netns: Option<String>, extra_args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tandem-e2e-")
            .tempdir()
            .expect("tempdir");
        let n = DAEMON_SEQ.fetch_add(1, Ordering::Relaxed);
        let mut d = Daemon {
            socket: dir.path().join("tandemd.sock"),
            state_dir: state_dir.unwrap_or_else(|| dir.path().join("state")),
            ram_dir: PathBuf::from(format!("/dev/shm/tandem-e2e-{}-{n}", std::process::id())),
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            netns,
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tandemd.log"))
            .expect("daemon log");
        let mut cmd = match &self.netns {
            // `ip netns exec` execs tandemd in place: the child's pid is
            // tandemd's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("tandemd"));
                c
            }
            None => Command::new(bin("tandemd")),
        };
        let child = cmd
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--ram-dir")
            .arg(&self.ram_dir)
            .arg("--image-dir")
            .arg(image_dir())
            .args(&self.extra_args)
            .env("TANDEM_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn tandemd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("tandemd exited at start ({status}):\n{}", self.log());
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("tandemd did not listen within 20 s:\n{}", self.log());
    }

    /// The daemon's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tandemd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Kills tandemd with `sig` and waits for it to exit.
    pub fn kill(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
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

    /// `POST path` with a JSON body on the daemon's socket (for routes the
    /// CLI has no command for: the fault-injection hooks). Status and body.
    pub fn api_post(&self, path: &str, body: &Value) -> (u16, String) {
        self.api_call("POST", path, &body.to_string())
    }

    /// `GET path` on the API socket: (status, body).
    pub fn api_get(&self, path: &str) -> (u16, String) {
        self.api_call("GET", path, "")
    }

    fn api_call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).expect("tandemd socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: tandemd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write request");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("read reply");
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// Replaces the extra arguments the next (re)start passes.
    pub fn set_args(&mut self, extra_args: &[&str]) {
        self.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
    }

    /// Kills tandemd and starts a new one on the same state.
    pub fn restart(&mut self, sig: i32) {
        self.kill(sig);
        self.spawn();
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("tandem"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tandem")
    }

    /// Runs the CLI, requiring success.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tandem {args:?} failed ({}):\nstdout: {}\nstderr: {}\ntandemd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `--json`, requiring success, and parses the output.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.cli_ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("tandem {args:?} printed non-JSON ({e}): {out}"))
    }

    /// Writes a spec for a small test guest and creates it. `extra` is TOML
    /// appended at top level before the tables (e.g. `accelerator = "auto"`).
    pub fn create_guest(&self, name: &str, extra: &str) -> PathBuf {
        let spec = self.guest_spec(name, extra);
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, spec).expect("write spec");
        self.cli_ok(&["vm", "create", path.to_str().expect("utf8 path")]);
        path
    }

    pub fn guest_spec(&self, name: &str, extra: &str) -> String {
        let img = image_dir();
        let disk = self.dir.path().join(format!("{name}-data.qcow2"));
        std::fs::copy(img.join("data.qcow2"), &disk).expect("copy data disk");
        format!(
            r#"name = "{name}"
memory_mib = 128
accelerator = "tcg"
shutdown_timeout_s = 20
{extra}

[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 loglevel=4 tandem.ip=10.99.0.2/24"

[[disks]]
name = "data"
path = "{disk}"

[[nics]]
name = "eth0"
mac = "52:54:00:99:00:02"
backend = "user"
"#,
            kernel = img.join("vmlinux").display(),
            initrd = img.join("initrd.img").display(),
            disk = disk.display(),
        )
    }

    pub fn info(&self, name: &str) -> Value {
        self.cli_json(&["vm", "info", name])
    }

    /// Waits until `text` appears on the VM's console.
    pub fn wait_console(&self, name: &str, text: &str, timeout: Duration) {
        let secs = timeout.as_secs().max(1).to_string();
        let out = self.cli(&["vm", "console", name, "--until", text, "--timeout", &secs]);
        if !out.status.success() {
            panic!(
                "`{text}` did not appear on {name}'s console within {timeout:?}: {}\nconsole:\n{}\ntandemd log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&String::from_utf8_lossy(&out.stdout), 30),
                tail(&self.log(), 30)
            );
        }
    }

    /// The whole console log so far.
    pub fn console(&self, name: &str) -> String {
        self.cli_ok(&["vm", "console", name])
    }

    /// Polls `vm info` until `pred` holds or the timeout passes.
    pub fn wait_info(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.info(name);
            if pred(&v) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("condition not reached within {timeout:?}; last info: {v:#}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// QEMU processes whose command line mentions this daemon's state.
    pub fn qemu_processes(&self) -> Vec<u32> {
        processes_mentioning(&self.state_dir.to_string_lossy(), "qemu-system")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
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
        self.kill(libc::SIGTERM);
        // Safety net: nothing this test started may outlive it.
        for pid in self.qemu_processes() {
            // SAFETY: plain kill(2) of a QEMU this test's daemon started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.ram_dir);
        if std::thread::panicking() {
            eprintln!("--- tandemd log (tail) ---\n{}", tail(&self.log(), 60));
        }
    }
}

/// Pids of processes whose executable name contains `exe` and whose command
/// line contains `needle`.
pub fn processes_mentioning(needle: &str, exe: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        let first = cmd.split('\0').next().unwrap_or("");
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if first.contains(exe) && cmd.contains(needle) && !zombie {
            out.push(pid);
        }
    }
    out
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The counter values in `tandem-guest: tick N` lines, in order.
pub fn ticks(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tandem-guest: tick "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// A network namespace this test created; deleted (with its interfaces)
/// on drop, on success and on panic.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `tsw<pid><tag>` (unique per test process and tag) with
    /// loopback up.
    pub fn new(tag: &str) -> Self {
        let name = format!("tsw{}{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&format!("ip netns add {name}"));
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace, requiring success.
    pub fn run(&self, argv: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "{argv:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered the namespace, so its sockets
    /// live there, and returns its result.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("thread in netns panicked")
    }

    /// Starts `f` on a thread that has entered the namespace; for work that
    /// runs alongside the test (a sink, a listener).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on a namespace fd we hold open; it only
            // changes this (fresh) thread's network namespace.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs a shell command, requiring success.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A line-oriented TCP exchange with the guest service; bounded in time.
pub fn request(addr: &str, line: &str, timeout: Duration) -> anyhow::Result<String> {
    use std::io::{BufRead, BufReader};
    let sock: std::net::SocketAddr = addr.parse().context("address")?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut r = BufReader::new(s);
    let mut reply = String::new();
    r.read_line(&mut reply)?;
    Ok(reply.trim_end().to_string())
}

/// A tmpfs of a fixed size, unmounted on drop.
pub struct SmallFs(pub std::path::PathBuf);
impl SmallFs {
    pub fn new(size: &str) -> SmallFs {
        let dir = tempfile::Builder::new()
            .prefix("tandem-smallfs-")
            .tempdir()
            .unwrap()
            .keep();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tandem-smallfs",
            ])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs (needs root)");
        SmallFs(dir)
    }
}
impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_parsed_in_order() {
        let c = "boot\r\ntandem-guest: tick 1\r\nnoise tick 9\ntandem-guest: tick 2\n";
        assert_eq!(ticks(c), [1, 2]);
    }
}
