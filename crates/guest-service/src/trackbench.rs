//! `TRACKBENCH <mib> <pages> <epochs>`: what one collect costs with each
//! dirty tracker, side by side on the same memory, on this guest's kernel
//! (Debian's, which has soft-dirty bits; the CI host's kernel has none, so
//! this is the only place the two can be timed against each other).
//!
//! A child process (`dirty-writer`) maps a tmpfs file of `mib` MiB shared, as
//! QEMU maps guest RAM, and first writes every page (a guest that has used
//! all of its RAM: the scan's worst case and the common one). Each epoch
//! it writes `pages` random pages; then both trackers collect, in
//! alternating order so neither always finds the memory cache-warm. A
//! collect is timed with the hole query the primary makes in the same
//! pause. Soft-dirty may report more than the scan (a write of an equal
//! value), never less: a page whose content changed and which soft-dirty
//! missed fails the run.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::time::Instant;

use tandem_dirty::{data_pages, DirtyTracker, RamView, ScanTracker, SoftDirtyTracker, PAGE_SIZE};

use crate::softdirty_check::{spawn_writer, with_shm_file, Rng, SharedMap};

pub fn run(mib: usize, pages_per_epoch: usize, epochs: u32) -> String {
    if let Err(why) = tandem_dirty::soft_dirty_support() {
        return format!("TRACKBENCH unsupported {why}");
    }
    match bench(mib, pages_per_epoch, epochs) {
        Ok(summary) => format!("TRACKBENCH ok {summary}"),
        Err(e) => format!("TRACKBENCH fail {e}"),
    }
}

fn bench(mib: usize, pages_per_epoch: usize, epochs: u32) -> Result<String, String> {
    // A tmpfs file, as tandemd's RAM files are (so punches are watched
    // with inotify, as in production).
    with_shm_file("tandem-trackbench", |file| {
        let pages = mib * (1 << 20) / PAGE_SIZE;
        file.set_len((pages * PAGE_SIZE) as u64)
            .map_err(|e| e.to_string())?;
        let mut map = SharedMap::new(&file, pages * PAGE_SIZE)?;
        let mut child = spawn_writer(&file, pages)?;
        let result = drive(
            &mut child,
            &file,
            map.bytes_mut(),
            pages,
            pages_per_epoch,
            epochs,
        );
        let _ = child.kill();
        let _ = child.wait();
        result
    })
}

fn drive(
    child: &mut std::process::Child,
    file: &File,
    ram: &mut [u8],
    pages: usize,
    pages_per_epoch: usize,
    epochs: u32,
) -> Result<String, String> {
    let mut to = child.stdin.take().ok_or("no stdin")?;
    let mut from = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut cmd = |line: Option<String>| -> Result<(), String> {
        if let Some(line) = line {
            writeln!(to, "{line}").map_err(|e| e.to_string())?;
        }
        let mut l = String::new();
        from.read_line(&mut l).map_err(|e| e.to_string())?;
        match l.trim() {
            "OK" | "READY" => Ok(()),
            other => Err(format!("writer said {other:?}")),
        }
    };
    cmd(None)?;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    // Every page written once, in batches the pipe takes comfortably.
    for chunk in (0..pages).collect::<Vec<_>>().chunks(4096) {
        let args: Vec<String> = chunk
            .iter()
            .map(|p| format!("{p} {}", 1 + p % 250))
            .collect();
        cmd(Some(format!("W {}", args.join(" "))))?;
    }
    let mut scan = ScanTracker::new(pages, 0);
    let mut soft = SoftDirtyTracker::new(child.id(), file, pages).map_err(|e| e.to_string())?;
    let collect = |t: &mut dyn DirtyTracker, ram: &[u8]| -> Result<(Vec<u64>, f64), String> {
        let t0 = Instant::now();
        let data = data_pages(file, ram).map_err(|e| format!("data pages: {e}"))?;
        let d = t
            .collect(RamView {
                bytes: ram,
                data: Some(&data),
            })
            .map_err(|e| e.to_string())?;
        Ok((d, t0.elapsed().as_secs_f64() * 1e6))
    };
    // The first collect of each is the initial copy: everything, untimed.
    collect(&mut scan, ram)?;
    collect(&mut soft, ram)?;
    let (mut scan_us, mut soft_us) = (Vec::new(), Vec::new());
    let (mut scan_reported, mut soft_reported) = (0usize, 0usize);
    let (mut read_us, mut decide_us, mut clear_us) = (Vec::new(), Vec::new(), Vec::new());
    for epoch in 0..epochs {
        let args: Vec<String> = (0..pages_per_epoch)
            .map(|_| format!("{} {}", rng.next() % pages as u64, 1 + rng.next() % 250))
            .collect();
        if !args.is_empty() {
            cmd(Some(format!("W {}", args.join(" "))))?;
        }
        let ((sd, st), (dd, dt)) = if epoch % 2 == 0 {
            let s = collect(&mut scan, ram)?;
            (s, collect(&mut soft, ram)?)
        } else {
            let d = collect(&mut soft, ram)?;
            (collect(&mut scan, ram)?, d)
        };
        let soft_set: std::collections::HashSet<u64> = dd.iter().copied().collect();
        if let Some(missed) = sd.iter().find(|p| !soft_set.contains(p)) {
            return Err(format!(
                "epoch {epoch}: page {missed} changed but soft-dirty did not report it"
            ));
        }
        let t = soft.last_timing;
        read_us.push(t.read_bits.as_secs_f64() * 1e6);
        decide_us.push(t.decide.as_secs_f64() * 1e6);
        clear_us.push(t.clear.as_secs_f64() * 1e6);
        scan_us.push(st);
        soft_us.push(dt);
        scan_reported += sd.len();
        soft_reported += dd.len();
    }
    let _ = cmd(Some("Q".into()));
    let (s50, s99) = p50_p99(&mut scan_us);
    let (d50, d99) = p50_p99(&mut soft_us);
    let n = epochs.max(1) as usize;
    let (read50, _) = p50_p99(&mut read_us);
    let (decide50, _) = p50_p99(&mut decide_us);
    let (clear50, _) = p50_p99(&mut clear_us);
    Ok(format!(
        "mib={} pages={pages} per_epoch={pages_per_epoch} epochs={epochs} \
         scan_p50_us={s50:.0} scan_p99_us={s99:.0} soft_p50_us={d50:.0} soft_p99_us={d99:.0} \
         scan_reported={} soft_reported={} soft_read_p50_us={read50:.0} \
         soft_decide_p50_us={decide50:.0} soft_clear_p50_us={clear50:.0} punches={}",
        (pages * PAGE_SIZE) >> 20,
        scan_reported / n,
        soft_reported / n,
        soft.punch_detection(),
    ))
}

fn p50_p99(v: &mut [f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}
