//! The tandem side of a cell: two tandemds (primary and backup,
//! replication over a unix socket) in the run's namespace, the guest
//! protected with the tracker asked for, its QEMU watched through a second
//! QMP monitor.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use super::measure::{measure, summarize, warm_up};
use super::qmp::Qmp;
use super::{data_dir, PauseOptions, SideResult, GUEST_CMDLINE, READY};
use crate::{block_on, tail, wait_for, DrillOptions, Host};

/// Host port of the guest service (inside the run's own namespace).
const TANDEM_PORT: u16 = 17071;

pub(super) fn run_tandem(
    o: &PauseOptions,
    ns: &str,
    work: &Path,
    mem: u32,
    dirty: u64,
    tracker: &str,
    say: &mut impl FnMut(&str),
) -> anyhow::Result<SideResult> {
    let dir = work.join(format!(
        "{}-t{mem}-{dirty}-{tracker}",
        work.file_name().and_then(|n| n.to_str()).unwrap_or("tcolo")
    ));
    std::fs::create_dir_all(&dir)?;
    // tandemd's QEMU, with a second QMP monitor for the bench's events
    // (tandemd also calls the binary for `--version`: left alone).
    let events = dir.join("bench-events.sock");
    let wrapper = dir.join("qemu-with-events");
    let data = data_dir(&o.qemu)
        .map(|d| format!(" -L '{}'", d.display()))
        .unwrap_or_default();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in\n  *\" -mon \"*) exec '{q}' \"$@\"{data} -chardev socket,id=bench-events,path='{e}',server=on,wait=off -mon chardev=bench-events,mode=control ;;\nesac\nexec '{q}' \"$@\"\n",
            q = o.qemu.display(),
            e = events.display(),
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let opts = DrillOptions {
        rounds: 1,
        kill: None,
        seed: o.seed,
        epoch_ms: o.epoch_ms,
        memory_mib: mem,
        output: "classified".into(),
        profile: "bulk-tcp".into(),
        unsafe_no_clamp: false,
        tandemd: o.tandemd.clone(),
        image_dir: o.image_dir.clone(),
        work_dir: o.work_dir.clone(),
        // Generous fencing: the initial copy of a 512 MiB guest, applied
        // by a backup on a busy 2-core machine, can starve heartbeats past
        // the default 1.5 s, and a fenced guest measures nothing. Failure
        // detection is not what this bench measures.
        timeouts: crate::FtTimeouts {
            heartbeat_ms: 100,
            fence_timeout_ms: 5000,
            takeover_timeout_ms: 7500,
        },
    };
    let repl = format!("unix:{}", dir.join("repl.sock").display());
    let owned = opts.timeouts.tandemd_args();
    let timeouts: Vec<&str> = owned.iter().map(String::as_str).collect();
    let mut b_args = timeouts.to_vec();
    b_args.extend(["--repl-listen", repl.as_str()]);
    let wrapper_s = wrapper.to_string_lossy().into_owned();
    let qboot = data_dir(&o.qemu)
        .map(|d| d.join("qboot.rom").to_string_lossy().into_owned())
        .unwrap_or_else(|| "/usr/share/qemu/qboot.rom".into());
    let mut a_args = timeouts.to_vec();
    a_args.extend(["--qemu", wrapper_s.as_str(), "--qboot-rom", qboot.as_str()]);
    // Drop order (reverse of declaration): A (the primary) goes first.
    let b = Host::start_with_switch("b", ns, "", &opts, &dir, &b_args)?;
    // The primary logs each pause's parts (`collect_us`): its collect is
    // read from there.
    std::env::set_var(
        "TANDEM_LOG",
        "info,tandem_replication::primary::epoch=debug",
    );
    let a = Host::start_with_switch("a", ns, "", &opts, &dir, &a_args);
    std::env::remove_var("TANDEM_LOG");
    let a = a?;
    let spec = format!(
        r#"name = "drill"
memory_mib = {mem}
accelerator = "tcg"
shutdown_timeout_s = 5
[boot]
kernel = "{k}"
initrd = "{i}"
cmdline = "{GUEST_CMDLINE}"
[[nics]]
name = "eth0"
mac = "52:54:00:77:00:20"
backend = "user"
host_forwards = [{{ host_port = {TANDEM_PORT}, guest_port = 7070 }}]
"#,
        k = o.image_dir.join("vmlinux").display(),
        i = o.image_dir.join("initrd.img").display(),
    );
    let api = a.api();
    let _: tandem_api::VmInfo = block_on(api.post(
        "/v1/vms",
        &tandem_api::CreateVmRequest {
            spec_toml: spec,
            uuid: None,
        },
    ))
    .context("defining the guest on tandemd")?;
    let _: tandem_api::VmInfo =
        block_on(api.post("/v1/vms/drill/start", &())).context("starting the guest")?;
    wait_for("guest ready (tandem)", Duration::from_secs(120), || {
        let c: tandem_api::ConsoleChunk =
            block_on(api.get("/v1/vms/drill/console?offset=0")).ok()?;
        c.data.contains(READY).then_some(())
    })
    .with_context(|| format!("tandemd A's log:\n{}", log_tail(&a.log, 6)))?;
    warm_up(ns, TANDEM_PORT)?;
    say(&format!("  tandem: protecting ({tracker} tracker)"));
    crate::protect_with_tracker(&a, &b, &repl, &opts, o.epoch_ms, Vec::new(), Some(tracker))
        .with_context(|| format!("protecting; tandemd A's log:\n{}", log_tail(&a.log, 6)))?;
    let log_from = std::fs::metadata(&a.log).map(|m| m.len()).unwrap_or(0);
    // Connected only now and read without pause from here on: an unread
    // monitor must not be able to hold QEMU up.
    let mut qmp = Qmp::connect(&events, Duration::from_secs(10), "tandem's QEMU")?;
    let (pauses, window, pages) = measure(&mut qmp, ns, TANDEM_PORT, o, dirty)?;
    drop(qmp);
    let log_to = std::fs::metadata(&a.log).map(|m| m.len()).unwrap_or(0);
    let mut collects = collect_times(&a.log, log_from, log_to);
    let st = crate::ft_primary(&a)?;
    if st.state.as_str() != "protected" {
        bail!(
            "the guest left protection during the run ({}): {}",
            st.state,
            log_tail(&a.log, 6)
        );
    }
    let unprotected: anyhow::Result<tandem_api::FtStatus> =
        block_on(api.post("/v1/vms/drill/unprotect", &())).map_err(Into::into);
    if let Err(e) = unprotected {
        say(&format!(
            "  tandem: unprotect failed ({e:#}); tearing down anyway"
        ));
    }
    if pauses.is_empty() {
        bail!("no STOP/RESUME pairs from tandem's QEMU in {window:.1} s");
    }
    let mut r = summarize(pauses, window, pages);
    r.reported_p50_ms = Some(st.pause_p50_ms);
    r.reported_p99_ms = Some(st.pause_p99_ms);
    r.reported_epochs_per_s = Some(st.epochs_per_s);
    r.tracker_note = Some(st.tracker.clone());
    if !collects.is_empty() {
        r.collect_p50_ms = Some(crate::stats_ms(&mut collects, 50.0));
        r.collect_p99_ms = Some(crate::stats_ms(&mut collects, 99.0));
    }
    drop(a);
    drop(b);
    Ok(r)
}

/// The collects (ms) tandemd's epoch debug lines report between two
/// offsets of its log (`collect_us=N`, colour codes stripped).
fn collect_times(log: &Path, from: u64, to: u64) -> Vec<f64> {
    let Ok(bytes) = std::fs::read(log) else {
        return Vec::new();
    };
    let end = (to as usize).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[(from as usize).min(end)..end]);
    strip_colour(&text)
        .lines()
        .filter(|l| l.contains("epoch captured"))
        .filter_map(|l| {
            let v = l.split("collect_us=").nth(1)?;
            let n: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
            n.parse::<f64>().ok().map(|us| us / 1000.0)
        })
        .collect()
}

/// The last `n` lines of a daemon log, without terminal colour codes.
fn log_tail(path: &Path, n: usize) -> String {
    strip_colour(&tail(path, n))
}

/// `text` without terminal colour codes (CSI sequences).
fn strip_colour(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            // CSI: parameters up to the final byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_drops_colour_codes() {
        let p = std::env::temp_dir().join(format!("colobench-tail-{}", std::process::id()));
        std::fs::write(&p, "a\n\u{1b}[2mtime\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x\n").unwrap();
        assert_eq!(log_tail(&p, 1), "time  WARN x");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn collect_times_are_read_from_the_epoch_lines() {
        let p = std::env::temp_dir().join(format!("colobench-collect-{}", std::process::id()));
        let before = "x DEBUG epoch captured \u{1b}[3mcollect_us\u{1b}[0m\u{1b}[2m=\u{1b}[0m9999\n";
        let text = format!(
            "{before}a DEBUG tandem_replication::primary::epoch: epoch captured epoch=3 stop_us=10 \u{1b}[3mcollect_us\u{1b}[0m\u{1b}[2m=\u{1b}[0m512 scan_us=900\nb INFO other collect_us=7\nc DEBUG epoch captured epoch=4 collect_us=1500 scan_us=1\n"
        );
        std::fs::write(&p, &text).unwrap();
        let got = collect_times(&p, before.len() as u64, text.len() as u64);
        assert_eq!(got, [0.512, 1.5]);
        let _ = std::fs::remove_file(&p);
    }
}
