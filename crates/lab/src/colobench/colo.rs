//! The COLO peer of a cell: a primary QEMU and a secondary QEMU
//! (`-incoming`) from the COLO-capable QEMU, capability `x-colo` on both,
//! migration over a unix socket until the primary reaches state `colo`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use super::measure::{measure, summarize, warm_up};
use super::qmp::Qmp;
use super::{
    check_interrupted, data_dir, interrupted, qemu_version, PauseOptions, SideResult,
    GUEST_CMDLINE, READY,
};
use crate::{tail, wait_for};

/// Host port of the guest service (inside the run's own namespace).
const COLO_PORT: u16 = 17072;
/// COLO under TCG sometimes loses its secondary mid-run; a cell tries it
/// this many times before giving up (failed attempts are reported).
const COLO_ATTEMPTS: usize = 3;

/// The two COLO QEMUs; killed (and reaped) when dropped.
struct ColoPair {
    children: Vec<(Child, PathBuf)>,
}

impl ColoPair {
    fn spawn(
        &mut self,
        ns: &str,
        o: &PauseOptions,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<()> {
        let logf = std::fs::File::create(&log)?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "env"]);
        if let Some(shim) = &o.colo_shim {
            c.arg(format!("LD_PRELOAD={}", shim.display()));
        }
        c.arg(&o.colo_qemu)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(logf));
        // SAFETY: only prctl(2) (async-signal-safe) runs between fork and
        // exec: QEMU dies with the bench even if the bench is killed
        // without unwinding.
        unsafe {
            c.pre_exec(|| {
                let _ = set_pdeathsig(Signal::SIGKILL);
                Ok(())
            });
        }
        let child = c
            .spawn()
            .with_context(|| format!("starting {}", o.colo_qemu.display()))?;
        self.children.push((child, log));
        Ok(())
    }

    /// Fails if a QEMU has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (c, log) in &mut self.children {
            if let Ok(Some(st)) = c.try_wait() {
                bail!("a COLO QEMU exited ({st}): {}", tail(log, 10));
            }
        }
        Ok(())
    }
}

impl Drop for ColoPair {
    fn drop(&mut self) {
        for (c, _) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Both QEMUs' command lines (primary, secondary) and the migration
/// socket between them.
fn colo_args(
    o: &PauseOptions,
    dir: &Path,
    mem: u32,
) -> anyhow::Result<(Vec<String>, Vec<String>, PathBuf)> {
    let data = data_dir(&o.colo_qemu).ok_or_else(|| {
        anyhow!(
            "{} has no firmware directory beside it (../share/qemu/qboot.rom)",
            o.colo_qemu.display()
        )
    })?;
    let common = |role: &str| -> Vec<String> {
        [
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-m",
            &mem.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-L",
            &data.to_string_lossy(),
            "-bios",
            &data.join("qboot.rom").to_string_lossy(),
            "-kernel",
            &o.image_dir.join("vmlinux").to_string_lossy(),
            "-initrd",
            &o.image_dir.join("initrd.img").to_string_lossy(),
            "-append",
            GUEST_CMDLINE,
            "-device",
            "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:77:00:21",
            "-name",
            &format!("colo-{role}"),
            "-serial",
            &format!("file:{}", dir.join(format!("{role}.serial")).display()),
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                dir.join(format!("{role}.qmp")).display()
            ),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mig = dir.join("migration.sock");
    let mut primary_args = common("primary");
    primary_args.extend([
        "-netdev".to_string(),
        format!("user,id=n0,hostfwd=tcp:127.0.0.1:{COLO_PORT}-:7070"),
    ]);
    let mut secondary_args = common("secondary");
    secondary_args.extend([
        "-netdev".to_string(),
        "user,id=n0".to_string(),
        "-incoming".to_string(),
        format!("unix:{}", mig.display()),
    ]);
    Ok((primary_args, secondary_args, mig))
}

/// The pair running: both QEMUs started, their monitors connected, the
/// primary's guest ready and its dirty buffer warmed up.
struct Running {
    // Field order is drop order: the monitors close before the QEMUs go.
    primary: Qmp,
    secondary: Qmp,
    pair: ColoPair,
    migration: PathBuf,
}

fn start_pair(o: &PauseOptions, ns: &str, dir: &Path, mem: u32) -> anyhow::Result<Running> {
    let (primary_args, secondary_args, migration) = colo_args(o, dir, mem)?;
    let mut pair = ColoPair {
        children: Vec::new(),
    };
    pair.spawn(ns, o, &primary_args, dir.join("primary.log"))?;
    pair.spawn(ns, o, &secondary_args, dir.join("secondary.log"))?;
    let primary = Qmp::connect(
        &dir.join("primary.qmp"),
        Duration::from_secs(20),
        "COLO primary",
    )
    .map_err(|e| pair.check_alive().err().unwrap_or(e))?;
    let secondary = Qmp::connect(
        &dir.join("secondary.qmp"),
        Duration::from_secs(20),
        "COLO secondary",
    )
    .map_err(|e| pair.check_alive().err().unwrap_or(e))?;
    let serial = dir.join("primary.serial");
    wait_for(
        "guest ready (COLO primary)",
        Duration::from_secs(120),
        || {
            if pair.check_alive().is_err() || interrupted() {
                return Some(());
            }
            std::fs::read_to_string(&serial)
                .ok()?
                .contains(READY)
                .then_some(())
        },
    )?;
    pair.check_alive()?;
    check_interrupted()?;
    warm_up(ns, COLO_PORT)?;
    Ok(Running {
        pair,
        primary,
        secondary,
        migration,
    })
}

/// Migrates the primary to the secondary with `x-colo` until the primary
/// is in state `colo`: periodic checkpoints every epoch from then on.
fn enter_colo(r: &mut Running, o: &PauseOptions) -> anyhow::Result<()> {
    let (p, s) = (&mut r.primary, &mut r.secondary);
    let colo = json!({"capabilities": [{"capability": "x-colo", "state": true}]});
    s.execute("migrate-set-capabilities", colo.clone())?;
    p.execute("migrate-set-capabilities", colo)?;
    p.execute(
        "migrate-set-parameters",
        json!({"x-checkpoint-delay": o.epoch_ms, "max-bandwidth": 1u64 << 40}),
    )?;
    p.execute(
        "migrate",
        json!({"uri": format!("unix:{}", r.migration.display())}),
    )?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        check_interrupted()?;
        r.pair.check_alive()?;
        let st = p.execute("query-migrate", json!({}))?;
        match st.get("status").and_then(Value::as_str).unwrap_or("") {
            "colo" => return Ok(()),
            "completed" => bail!(
                "{}: the migration ended `completed` instead of entering `colo`: COLO is broken in this QEMU (known for 10.0/10.1); use qemu-scripts/colo-qemu.sh",
                qemu_version(&o.colo_qemu)
            ),
            "failed" | "cancelled" => bail!(
                "COLO migration failed: {}",
                st.get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
            ),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("the primary did not reach COLO state within 120 s: {st}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_colo(
    o: &PauseOptions,
    ns: &str,
    dir: &Path,
    mem: u32,
    dirty: u64,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<SideResult> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut r = start_pair(o, ns, dir, mem)?;
    say("  COLO: migrating to the secondary");
    enter_colo(&mut r, o)?;
    let (pauses, window, pages) = measure(&mut r.primary, ns, COLO_PORT, o, dirty)?;
    // A primary that stopped answering is the 7.2 + TCG deadlock (without
    // the shim): its numbers would be meaningless.
    r.primary
        .execute("query-status", json!({}))
        .context("the COLO primary after the window")?;
    let mode = r.secondary.execute("query-colo-status", json!({}))?;
    if mode.get("mode").and_then(Value::as_str) != Some("secondary") {
        bail!("the COLO secondary left COLO during the run: {mode}");
    }
    r.pair.check_alive()?;
    if pauses.is_empty() {
        bail!(
            "no COLO checkpoints in {window:.1} s (without {}, QEMU 7.2 under TCG deadlocks on its first checkpoints)",
            "qemu-scripts/colo-bql-shim.c"
        );
    }
    drop(r);
    Ok(summarize(pauses, window, pages))
}

/// [`run_colo`], retried up to [`COLO_ATTEMPTS`] times.
pub(super) fn run_colo_retried(
    o: &PauseOptions,
    ns: &str,
    work: &Path,
    mem: u32,
    dirty: u64,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<SideResult> {
    let mut failed = Vec::new();
    loop {
        check_interrupted()?;
        let dir = work.join(format!("colo-{mem}-{dirty}"));
        match run_colo(o, ns, &dir, mem, dirty, say) {
            Ok(mut r) => {
                r.failed_attempts = failed;
                return Ok(r);
            }
            Err(e) if failed.len() + 1 < COLO_ATTEMPTS && !interrupted() => {
                let secondary = tail(&dir.join("secondary.log"), 3);
                let why = if secondary.trim().is_empty() {
                    format!("{e:#}")
                } else {
                    format!(
                        "{e:#}; secondary: {}",
                        secondary.trim().replace('\n', " / ")
                    )
                };
                say(&format!(
                    "  COLO attempt {} failed: {why}; retrying",
                    failed.len() + 1
                ));
                let _ = std::fs::rename(
                    &dir,
                    work.join(format!("colo-{mem}-{dirty}-failed{}", failed.len() + 1)),
                );
                failed.push(why);
            }
            Err(e) => {
                return Err(e.context(format!(
                    "after {} failed attempt(s): {}",
                    failed.len(),
                    failed.join(" | ")
                )))
            }
        }
    }
}
