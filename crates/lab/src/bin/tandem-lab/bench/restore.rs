//! `tandem bench restore`: how long a failover's restore takes
//! (takeover decision → guest running on the backup) for guests of several
//! sizes, RAM and disk, side by side; and what the guest gets done in the
//! first seconds after the failover, against the same guest before.
//!
//! Each round is a fresh pair of tandemds on this host (replication over a
//! unix socket): the guest (its data disk plus a `bulk` raw disk of the
//! size asked for, filled with data) boots on host A and is protected to
//! B; A's QEMU is killed, A's tandemd reports it, and B takes over at
//! once. B's `ft status` gives the restore time. The guest's work is the
//! guest service's `DIRTY` (rewriting pages of a 32 MiB buffer), timed
//! from outside: MiB written per second of wall time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

/// One guest size: RAM and the `bulk` disk, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Size {
    pub memory_mib: u32,
    pub disk_mib: u64,
}

impl std::str::FromStr for Size {
    type Err = String;
    /// `RAM` or `RAM+DISK`, in MiB: `128`, `1024+4096`.
    fn from_str(s: &str) -> Result<Size, String> {
        let (m, d) = s.split_once('+').unwrap_or((s, "0"));
        let bad = || format!("`{s}`: a size is RAM[+DISK] in MiB, e.g. 1024+4096");
        Ok(Size {
            memory_mib: m.trim().parse().map_err(|_| bad())?,
            disk_mib: d.trim().parse().map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.disk_mib {
            0 => write!(f, "{}", self.memory_mib),
            d => write!(f, "{}+{d}", self.memory_mib),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub sizes: Vec<Size>,
    pub rounds: u32,
    /// Seconds of guest work measured before protection and after the
    /// failover (0: none).
    pub seconds: u64,
    pub epoch_ms: u64,
    /// Before the kill, flush what the backup's filesystem still has to
    /// write back of the initial copy (`sync -f`), so the takeover meets a
    /// backup in its steady state rather than one still writing back the
    /// GiBs it just received (its durable writes then queue behind them).
    pub settle: bool,
    pub tandemd: PathBuf,
    pub image_dir: PathBuf,
    pub work_dir: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Round {
    /// Takeover decision → guest running on the backup (its `ft status`).
    pub restore_ms: f64,
    /// The primary's crash report → decision.
    pub detection_ms: f64,
    /// Protection to a resumable replica (the initial copy), seconds.
    pub protect_s: f64,
    /// Guest work after the failover, MiB/s (first `seconds` seconds).
    pub after_mib_s: f64,
    /// The first request after the failover, ms (a fresh QEMU: TCG's
    /// translation cache is cold, and guest RAM is faulted in).
    pub first_request_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub size: Size,
    pub rounds: Vec<Round>,
    pub restore_p50_ms: f64,
    pub restore_p99_ms: f64,
    /// Guest work before protection (RAM on tmpfs), MiB/s, once per size.
    pub before_mib_s: f64,
    pub after_p50_mib_s: f64,
    pub first_request_p50_ms: f64,
}

/// Nearest-rank percentile.
fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn run(o: &Options, mut say: impl FnMut(&str)) -> anyhow::Result<Vec<Row>> {
    for f in ["vmlinux", "initrd.img", "data.qcow2"] {
        if !o.image_dir.join(f).is_file() {
            bail!(
                "guest image {} missing: run images/build.sh",
                o.image_dir.join(f).display()
            );
        }
    }
    if !o.tandemd.is_file() {
        bail!("tandemd not found at {}", o.tandemd.display());
    }
    let base = o.work_dir.join(format!("trestore-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let mut rows = Vec::new();
    for &size in &o.sizes {
        // The bulk disk, filled once per size: the guest never writes it,
        // so every round's primary starts from the same one.
        let bulk = base.join(format!("bulk-{}.raw", size.disk_mib));
        if size.disk_mib > 0 {
            say(&format!("writing a {} MiB bulk disk", size.disk_mib));
            fill_disk(&bulk, size.disk_mib)?;
        }
        let mut rounds = Vec::new();
        let mut before = 0.0;
        for n in 1..=o.rounds {
            say(&format!("{size}: round {n}/{}", o.rounds));
            let dir = base.join(format!("{size}-{n}"));
            let measure_before = n == 1 && o.seconds > 0;
            let (r, b) = round(o, size, &bulk, &dir, measure_before, &mut say)
                .with_context(|| format!("{size} MiB, round {n} (logs in {})", dir.display()))?;
            if let Some(b) = b {
                before = b;
            }
            say(&format!(
                "{size}: restore {:.0} ms (detection {:.0} ms), initial copy {:.1} s, after failover {:.1} MiB/s, first request {:.0} ms",
                r.restore_ms, r.detection_ms, r.protect_s, r.after_mib_s, r.first_request_ms
            ));
            rounds.push(r);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let _ = std::fs::remove_file(&bulk);
        let restore: Vec<f64> = rounds.iter().map(|r| r.restore_ms).collect();
        let after: Vec<f64> = rounds.iter().map(|r| r.after_mib_s).collect();
        let first: Vec<f64> = rounds.iter().map(|r| r.first_request_ms).collect();
        rows.push(Row {
            size,
            restore_p50_ms: pct(&restore, 50.0),
            restore_p99_ms: pct(&restore, 99.0),
            before_mib_s: before,
            after_p50_mib_s: pct(&after, 50.0),
            first_request_p50_ms: pct(&first, 50.0),
            rounds,
        });
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(rows)
}

/// A raw disk of `mib` MiB, every block written (a non-zero pattern that
/// differs per MiB), so replica and copy hold real data.
fn fill_disk(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (i as usize * 31 + j / 4096 + 1) as u8;
        }
        f.write_all(&block)?;
    }
    f.sync_all()?;
    Ok(())
}

/// A tandemd of this bench; killed (with whatever QEMU it ran) on drop.
struct Daemon {
    socket: PathBuf,
    state: PathBuf,
    ram_dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Daemon {
    fn start(o: &Options, dir: &Path, name: &str, extra: &[&str]) -> anyhow::Result<Daemon> {
        let socket = dir.join(format!("{name}.sock"));
        let state = dir.join(name);
        let ram_dir = PathBuf::from(format!(
            "/dev/shm/{}-{name}",
            dir.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("trestore")
        ));
        let log = dir.join(format!("tandemd-{name}.log"));
        let child = Command::new(&o.tandemd)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .arg("--ram-dir")
            .arg(&ram_dir)
            .arg("--image-dir")
            .arg(&o.image_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()
            .context("starting tandemd")?;
        let mut d = Daemon {
            socket,
            state,
            ram_dir,
            log,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
            if let Ok(Some(st)) = d.child.try_wait() {
                bail!("tandemd {name} exited ({st}): {}", tail(&d.log));
            }
            if Instant::now() > deadline {
                bail!("tandemd {name} did not start: {}", tail(&d.log));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(d)
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let c = tandem_api::Client::new(&self.socket);
        Ok(block_on(c.get::<Value>(path))?)
    }

    fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let c = tandem_api::Client::new(&self.socket);
        block_on(c.post::<Value, Value>(path, &body))
            .with_context(|| format!("POST {path}; tandemd log:\n{}", tail(&self.log)))
    }

    /// This host's `ft status` of the VM, in `role`.
    fn ft(&self, role: &str) -> Option<Value> {
        let v = self.get(&format!("/v1/ft/{VM}")).ok()?;
        v.as_array()?.iter().find(|s| s["role"] == role).cloned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let c = tandem_api::Client::new(&self.socket);
        let _ = block_on(c.delete::<Value>(&format!("/v1/vms/{VM}")));
        // Our own child: SIGTERM first, then SIGKILL.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in qemus_of(&self.state) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(&self.ram_dir);
    }
}

const VM: &str = "restore";

/// QEMUs whose command line names `state` (a daemon's state directory).
fn qemus_of(state: &Path) -> Vec<i32> {
    let needle = state.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("qemu-system") || c.contains("/qemu-system")
            }) && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(f)
}

fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request to the guest service at `port`; the reply line.
fn request(port: u16, line: &str, timeout: Duration) -> anyhow::Result<String> {
    use std::io::{BufRead, BufReader};
    let s = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    (&s).write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    Ok(reply.trim_end().to_string())
}

/// Pages the guest rewrites per request: 10 MiB.
const DIRTY_PAGES: u64 = 2560;

/// Guest work for `seconds`: `DIRTY` requests back to back; MiB/s of wall
/// time, and how long the first request took.
fn dirty_rate(port: u16, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let mut pages = 0u64;
    let mut first = None;
    while start.elapsed() < Duration::from_secs(seconds) {
        let t = Instant::now();
        let r = request(
            port,
            &format!("DIRTY {DIRTY_PAGES}"),
            Duration::from_secs(60),
        )?;
        if !r.starts_with("DIRTIED") {
            bail!("the guest answered {r:?} to DIRTY");
        }
        first.get_or_insert(t.elapsed().as_secs_f64() * 1e3);
        pages += DIRTY_PAGES;
    }
    let mib = (pages * 4096) as f64 / (1 << 20) as f64;
    Ok((mib / start.elapsed().as_secs_f64(), first.unwrap_or(0.0)))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One round; also the guest's work before protection when asked.
fn round(
    o: &Options,
    size: Size,
    bulk: &Path,
    dir: &Path,
    measure_before: bool,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<(Round, Option<f64>)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let repl = format!("unix:{}", dir.join("repl.sock").display());
    // Generous fencing: a busy 2-core machine applying a multi-GiB initial
    // copy (one epoch carries the whole disk) must not be taken for a dead
    // primary, nor have protection degrade and start the copy over.
    // Detection is not what this measures (the primary reports its QEMU's
    // crash).
    let timeouts = [
        "--ft-fence-timeout-ms",
        "60000",
        "--ft-takeover-timeout-ms",
        "65000",
        "--ft-degrade-after-ms",
        "0",
    ];
    let mut b_args = timeouts.to_vec();
    b_args.extend(["--repl-listen", repl.as_str()]);
    // Drop order: A first.
    let b = Daemon::start(o, dir, "b", &b_args)?;
    let a = Daemon::start(o, dir, "a", &timeouts)?;
    let data = dir.join("data.qcow2");
    std::fs::copy(o.image_dir.join("data.qcow2"), &data)?;
    let port = free_port()?;
    let mut spec = format!(
        r#"name = "{VM}"
memory_mib = {mem}
accelerator = "tcg"
shutdown_timeout_s = 5
[boot]
kernel = "{k}"
initrd = "{i}"
cmdline = "console=ttyS0 loglevel=4 tandem.ip=10.0.2.15/24 tandem.gw=10.0.2.2"
[[disks]]
name = "data"
path = "{d}"
"#,
        mem = size.memory_mib,
        k = o.image_dir.join("vmlinux").display(),
        i = o.image_dir.join("initrd.img").display(),
        d = data.display(),
    );
    if size.disk_mib > 0 {
        spec.push_str(&format!(
            "[[disks]]\nname = \"bulk\"\npath = \"{}\"\nformat = \"raw\"\n",
            bulk.display()
        ));
    }
    spec.push_str(&format!(
        "[[nics]]\nname = \"eth0\"\nmac = \"52:54:00:77:00:30\"\nbackend = \"user\"\nhost_forwards = [{{ host_port = {port}, guest_port = 7070 }}]\n"
    ));
    a.post("/v1/vms", json!({ "spec_toml": spec }))?;
    a.post(&format!("/v1/vms/{VM}/start"), json!({}))?;
    wait_for("the guest's boot", Duration::from_secs(180), || {
        let c = a.get(&format!("/v1/vms/{VM}/console?offset=0")).ok()?;
        c["data"]
            .as_str()?
            .contains("TANDEM-GUEST-READY")
            .then_some(())
    })?;
    // Warm-up: TCG's translation cache, and the buffer's first touch.
    dirty_rate(port, 1)?;
    let before = if measure_before {
        say(&format!(
            "{size}: guest work before protection, {} s",
            o.seconds
        ));
        Some(dirty_rate(port, o.seconds)?.0)
    } else {
        None
    };
    let t = Instant::now();
    a.post(
        &format!("/v1/vms/{VM}/protect"),
        json!({ "backup": repl, "epoch_ms": o.epoch_ms }),
    )?;
    wait_for("protection", Duration::from_secs(1800), || {
        let s = a.ft("primary")?;
        (s["state"] == "protected" && s["last_committed"].as_u64()? >= 3).then_some(())
    })
    .with_context(|| format!("tandemd A:\n{}", tail(&a.log)))?;
    wait_for("the backup's standby", Duration::from_secs(60), || {
        (b.ft("backup")?["state"] == "standby").then_some(())
    })?;
    let protect_s = t.elapsed().as_secs_f64();
    if o.settle {
        let synced = Command::new("sync").arg("-f").arg(&b.state).status()?;
        if !synced.success() {
            bail!("sync -f {}: {synced}", b.state.display());
        }
    }
    let pid = a.get(&format!("/v1/vms/{VM}"))?["pid"]
        .as_i64()
        .context("the primary's QEMU pid")?;
    // The crash A's tandemd reports at once: B decides without waiting.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let st = wait_for("the takeover", Duration::from_secs(120), || {
        let s = b.ft("backup")?;
        (s["state"] == "failed-over").then_some(s)
    })
    .with_context(|| format!("tandemd B:\n{}", tail(&b.log)))?;
    let report = &st["failover"];
    let (after, first) = if o.seconds > 0 {
        dirty_rate(port, o.seconds)?
    } else {
        (0.0, 0.0)
    };
    drop(a);
    drop(b);
    Ok((
        Round {
            restore_ms: report["restore_ms"].as_f64().unwrap_or(0.0),
            detection_ms: report["detection_ms"].as_f64().unwrap_or(0.0),
            protect_s,
            after_mib_s: after,
            first_request_ms: first,
        },
        before,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print_as_given() {
        for s in ["128", "1024+4096"] {
            assert_eq!(s.parse::<Size>().unwrap().to_string(), s);
        }
        assert_eq!(
            "1024+4096".parse::<Size>().unwrap(),
            Size {
                memory_mib: 1024,
                disk_mib: 4096
            }
        );
        assert!("x".parse::<Size>().is_err());
        assert!("1+y".parse::<Size>().is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(pct(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(pct(&[3.0, 1.0, 2.0], 99.0), 3.0);
        assert_eq!(pct(&[], 50.0), 0.0);
    }
}
