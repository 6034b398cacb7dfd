//! `SOFTDIRTY <epochs>`: checks tandem's soft-dirty tracker against this
//! guest's kernel (Debian's, built with `CONFIG_MEM_SOFT_DIRTY`; the CI
//! host's kernel has none, so this is where the tracker meets the real
//! thing).
//!
//! A child process (this binary, `dirty-writer` mode) maps a memfd shared,
//! as QEMU maps guest RAM, and is tracked through its `/proc` files. Each
//! epoch it is told to write pages, read pages (and later write them: a
//! page first mapped by a read must still fault when written), and write
//! then drop pages (`MADV_DONTNEED`, which loses the bit); this process
//! punches holes and writes pages through its own mapping, reported as
//! external writes, as the switch's are. A replica is updated with only
//! the pages the tracker reports; after every epoch it must equal the
//! memfd byte for byte.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Command, Stdio};

use tandem_dirty::{data_pages, DirtyTracker, RamView, SoftDirtyTracker, PAGE_SIZE};

const PAGES: usize = 2048;

/// xorshift64: reproducible page choices, no dependency.
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn page(&mut self) -> usize {
        (self.next() % PAGES as u64) as usize
    }
}

/// A shared read-write mapping of a file, unmapped on drop.
pub(crate) struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

impl SharedMap {
    pub(crate) fn new(file: &File, len: usize) -> Result<SharedMap, String> {
        // SAFETY: asks for a fresh mapping; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(SharedMap { ptr: p.cast(), len })
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` is mapped until drop, and callers never
        // shrink the file under it; the borrow ties the slice to `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no slice of which outlives
        // this borrow of `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Runs `f` on a fresh file `/dev/shm/<name>-<pid>` (tmpfs, as tandemd's
/// RAM files are), removed afterwards.
pub(crate) fn with_shm_file<T>(
    name: &str,
    f: impl FnOnce(File) -> Result<T, String>,
) -> Result<T, String> {
    let path = format!("/dev/shm/{name}-{}", std::process::id());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{path}: {e}"))?;
    let result = f(file);
    let _ = std::fs::remove_file(&path);
    result
}

/// Starts the `dirty-writer` child on the first `pages` pages of `file`
/// (through this process's descriptor for it).
pub(crate) fn spawn_writer(file: &File, pages: usize) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Command::new(exe)
        .arg("dirty-writer")
        .arg(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            file.as_raw_fd()
        ))
        .arg(pages.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning the writer: {e}"))
}

/// The child: applies commands from stdin to its mapping of the file's
/// first `pages` pages.
pub fn writer(path: &str, pages: usize) -> ! {
    let code = match writer_loop(path, pages) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("dirty-writer: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn writer_loop(path: &str, pages: usize) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    let mut map = SharedMap::new(&file, pages * PAGE_SIZE)?;
    let map = map.bytes_mut();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY");
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let mut it = line.split_whitespace();
        let op = it.next().unwrap_or("");
        let nums: Vec<usize> = it.filter_map(|n| n.parse().ok()).collect();
        match op {
            "Q" => return Ok(()),
            // W page value ...: write one byte at a value-dependent offset.
            "W" | "Z" => {
                for pv in nums.chunks_exact(2) {
                    let (p, v) = (pv[0] % pages, pv[1]);
                    let at = p * PAGE_SIZE + (v * 31) % PAGE_SIZE;
                    // SAFETY: `at` is inside the mapping.
                    unsafe { std::ptr::write_volatile(&mut map[at], v as u8) };
                    if op == "Z" {
                        // SAFETY: drops this process's entry for one page of
                        // its own shared mapping; the data stays in the file.
                        unsafe {
                            libc::madvise(
                                map.as_mut_ptr().add(p * PAGE_SIZE) as *mut libc::c_void,
                                PAGE_SIZE,
                                libc::MADV_DONTNEED,
                            )
                        };
                    }
                }
            }
            "R" => {
                for &p in &nums {
                    // SAFETY: inside the mapping; a read that faults the
                    // page in without writing it.
                    let _ = unsafe { std::ptr::read_volatile(&map[(p % pages) * PAGE_SIZE]) };
                }
            }
            _ => return Err(format!("unknown command {line:?}")),
        }
        let _ = writeln!(out, "OK");
        let _ = out.flush();
    }
    Ok(())
}

/// A writer command naming `pages`.
fn command(op: &str, pages: &[usize]) -> String {
    let args: Vec<String> = pages.iter().map(|p| p.to_string()).collect();
    format!("{op} {}", args.join(" "))
}

/// A writer command naming `pages`, each with a random non-zero value.
fn with_values(op: &str, pages: &[usize], rng: &mut Rng) -> String {
    let args: Vec<String> = pages
        .iter()
        .map(|&p| format!("{p} {}", 1 + rng.next() % 250))
        .collect();
    format!("{op} {}", args.join(" "))
}

pub fn run(epochs: u32) -> String {
    if let Err(why) = tandem_dirty::soft_dirty_support() {
        return format!("SOFTDIRTY unsupported {why}");
    }
    match check(epochs) {
        Ok(summary) => format!("SOFTDIRTY ok {summary}"),
        Err(e) => format!("SOFTDIRTY fail {e}"),
    }
}

/// Runs the check on a memfd (no path: punches noticed by the file's
/// ctime) and on a tmpfs file (as tandemd's RAM files are: punches noticed
/// by an inotify watch), one summary each, joined by ` | `.
fn check(epochs: u32) -> Result<String, String> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by
    // the File below.
    let fd = unsafe { libc::memfd_create(c"tandem-sd-check".as_ptr(), 0) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let memfd = unsafe { File::from_raw_fd(fd) };
    let on_memfd = check_file(memfd, epochs).map_err(|e| format!("memfd: {e}"))?;
    let on_tmpfs = with_shm_file("tandem-sd-check", |f| check_file(f, epochs))
        .map_err(|e| format!("tmpfs: {e}"))?;
    Ok(format!("{on_memfd} | {on_tmpfs}"))
}

fn check_file(file: File, epochs: u32) -> Result<String, String> {
    file.set_len((PAGES * PAGE_SIZE) as u64)
        .map_err(|e| e.to_string())?;
    let mut map = SharedMap::new(&file, PAGES * PAGE_SIZE)?;
    let mut child = spawn_writer(&file, PAGES)?;
    let result = drive(&mut child, &file, map.bytes_mut(), epochs);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn drive(
    child: &mut std::process::Child,
    file: &File,
    ram: &mut [u8],
    epochs: u32,
) -> Result<String, String> {
    let mut to = child.stdin.take().ok_or("no stdin")?;
    let mut from = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let reply = move |from: &mut BufReader<_>| -> Result<(), String> {
        let mut l = String::new();
        from.read_line(&mut l).map_err(|e| e.to_string())?;
        match l.trim() {
            "OK" | "READY" => Ok(()),
            other => Err(format!("writer said {other:?}")),
        }
    };
    reply(&mut from)?;
    let mut tracker = SoftDirtyTracker::new(child.id(), file, PAGES).map_err(|e| e.to_string())?;
    let mut replica = vec![0u8; PAGES * PAGE_SIZE];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut writes, mut reported, mut extra, mut hashed) = (0usize, 0usize, 0usize, 0usize);
    let mut read_before: Vec<usize> = Vec::new();
    for epoch in 0..=epochs {
        let mut touched = std::collections::BTreeSet::new();
        // What happened to each page this epoch, for a failure's report.
        let mut events: std::collections::BTreeMap<usize, String> = Default::default();
        let mut note = |pages: &[usize], what: &str| {
            for &p in pages {
                events.entry(p).or_default().push_str(what);
            }
        };
        if epoch > 0 {
            let mut cmd = |line: String| -> Result<(), String> {
                writeln!(to, "{line}").map_err(|e| e.to_string())?;
                reply(&mut from)
            };
            // Writes by the tracked process, including pages it only read
            // last epoch.
            let mut w: Vec<usize> = (0..rng.next() % 40).map(|_| rng.page()).collect();
            w.append(&mut read_before);
            cmd(with_values("W", &w, &mut rng))?;
            touched.extend(w.iter().copied());
            note(&w, "W");
            writes += w.len();
            // Reads that fault pages in without writing them.
            let r: Vec<usize> = (0..rng.next() % 20).map(|_| rng.page()).collect();
            cmd(command("R", &r))?;
            note(&r, "R");
            read_before = r;
            // Write, then lose the entry (and with it the bit).
            let z: Vec<usize> = (0..rng.next() % 6).map(|_| rng.page()).collect();
            cmd(with_values("Z", &z, &mut rng))?;
            touched.extend(z.iter().copied());
            note(&z, "Z");
            // Holes punched by someone else (QEMU discarding a page); some
            // are faulted straight back in by a read, over a new frame and
            // without a soft-dirty bit.
            let mut punched = Vec::new();
            for _ in 0..rng.next() % 3 {
                let p = rng.page();
                punched.push(p);
                // SAFETY: punching one page of our own memfd.
                unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        (p * PAGE_SIZE) as i64,
                        PAGE_SIZE as i64,
                    )
                };
                touched.insert(p);
            }
            note(&punched, "P");
            punched.retain(|_| rng.next().is_multiple_of(2));
            note(&punched, "R");
            cmd(command("R", &punched))?;
            // Writes through this process's mapping, reported explicitly.
            let e: Vec<usize> = (0..rng.next() % 5).map(|_| rng.page()).collect();
            for &p in &e {
                ram[p * PAGE_SIZE + 100] = ram[p * PAGE_SIZE + 100].wrapping_add(1);
            }
            tracker.note_external_writes(&mut e.iter().map(|&p| p as u64));
            touched.extend(e.iter().copied());
            note(&e, "E");
        }
        let data = data_pages(file, ram).map_err(|e| format!("data pages: {e}"))?;
        let dirty = tracker
            .collect(RamView {
                bytes: ram,
                data: Some(&data),
            })
            .map_err(|e| format!("epoch {epoch}: {e}"))?;
        hashed += tracker.last_hashed;
        if epoch == 0 {
            if dirty.len() != PAGES {
                return Err(format!(
                    "the first collect reported {} of {PAGES} pages",
                    dirty.len()
                ));
            }
        } else {
            reported += dirty.len();
            extra += dirty
                .iter()
                .filter(|&&p| !touched.contains(&(p as usize)))
                .count();
        }
        for &p in &dirty {
            let r = p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE;
            replica[r.clone()].copy_from_slice(&ram[r]);
        }
        let missed: Vec<usize> = (0..PAGES)
            .filter(|p| {
                let r = p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
                replica[r.clone()] != ram[r]
            })
            .collect();
        if !missed.is_empty() {
            let what: Vec<String> = missed
                .iter()
                .take(8)
                .map(|p| format!("{p}:{}", events.get(p).map(String::as_str).unwrap_or("-")))
                .collect();
            return Err(format!(
                "epoch {epoch}: {} changed pages not reported (page:ops this epoch {})",
                missed.len(),
                what.join(" ")
            ));
        }
    }
    let _ = writeln!(to, "Q");
    Ok(format!(
        "punches={} epochs={epochs} pages={PAGES} writes={writes} reported={reported} extra={extra} hashed={hashed} missed=0",
        tracker.punch_detection()
    ))
}
