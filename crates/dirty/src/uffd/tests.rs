use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use nix::fcntl::FallocateFlags;
use nix::sys::mman::{madvise, mmap, munmap, MapFlags, MmapAdvise, ProtFlags};
use proptest::prelude::*;

use super::*;

/// What can happen to a page between two collects, as the decider sees it.
#[derive(Clone, Debug)]
enum Op {
    /// A write through QEMU's mapping: reported written.
    Write(usize, u8),
    /// Written, then punched before the collect: the entry is gone, so is
    /// the written state; the page reads zero.
    WriteThenPunch(usize, u8),
    /// Punched (and maybe read back in): zero, not reported written.
    Punch(usize),
    /// Punched, then written again: written.
    PunchThenWrite(usize, u8),
    /// Written by the switch through its own mapping, logged.
    External(usize, u8),
}

const PAGES: usize = 24;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..PAGES, 1u8..).prop_map(|(p, v)| Op::Write(p, v)),
        (0..PAGES, 1u8..).prop_map(|(p, v)| Op::WriteThenPunch(p, v)),
        (0..PAGES).prop_map(Op::Punch),
        (0..PAGES, 1u8..).prop_map(|(p, v)| Op::PunchThenWrite(p, v)),
        (0..PAGES, 1u8..).prop_map(|(p, v)| Op::External(p, v)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// A replica updated with only the reported pages equals RAM after
    /// every epoch; and without a punch nothing is reported that was not
    /// written.
    #[test]
    fn the_replica_never_misses_a_change(epochs in proptest::collection::vec(proptest::collection::vec(op(), 0..12), 1..8)) {
        let mut ram = vec![0u8; PAGES * PAGE_SIZE];
        let mut data = PageSet::new(PAGES);
        let mut replica = vec![0xAAu8; PAGES * PAGE_SIZE];
        let mut d = Decider::new(PAGES);
        for ops in std::iter::once(Vec::new()).chain(epochs) {
            let mut written = PageSet::new(PAGES);
            let mut touched = PageSet::new(PAGES);
            let mut external = Vec::new();
            let mut punched = false;
            let set = |ram: &mut Vec<u8>, p: usize, v: u8| ram[p * PAGE_SIZE + v as usize] = v;
            let zero = |ram: &mut Vec<u8>, p: usize| ram[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(0);
            for op in ops {
                match op {
                    Op::Write(p, v) => { set(&mut ram, p, v); data.insert(p); written.insert(p); touched.insert(p); }
                    Op::WriteThenPunch(p, v) => {
                        set(&mut ram, p, v); zero(&mut ram, p); data.remove(p); written.remove(p);
                        punched = true; touched.insert(p);
                    }
                    Op::Punch(p) => { zero(&mut ram, p); data.remove(p); written.remove(p); punched = true; touched.insert(p); }
                    Op::PunchThenWrite(p, v) => {
                        zero(&mut ram, p); set(&mut ram, p, v); data.insert(p); written.insert(p);
                        punched = true; touched.insert(p);
                    }
                    Op::External(p, v) => { ram[p * PAGE_SIZE + 7] = v; data.insert(p); external.push(p as u64); touched.insert(p); }
                }
            }
            let first = d.all_pending();
            d.note_external_writes(&mut external.into_iter());
            let dirty = d.decide(RamView { bytes: &ram, data: Some(&data) }, &written, punched);
            for &p in &dirty {
                let r = p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE;
                replica[r.clone()].copy_from_slice(&ram[r]);
                prop_assert!(first || punched || touched.contains(p as usize), "page {} reported untouched", p);
            }
            prop_assert!(replica == ram);
        }
    }
}

#[test]
fn a_punch_reports_only_pages_whose_replica_is_not_zero() {
    let mut ram = vec![0u8; 4 * PAGE_SIZE];
    ram[PAGE_SIZE + 9] = 5;
    let mut data = PageSet::new(4);
    data.insert(1);
    let mut d = Decider::new(4);
    let none = PageSet::new(4);
    assert_eq!(
        d.decide(
            RamView {
                bytes: &ram,
                data: Some(&data)
            },
            &none,
            false
        ),
        [0, 1, 2, 3],
        "the first collect reports all"
    );
    ram[PAGE_SIZE + 9] = 0;
    data.remove(1);
    assert!(d
        .decide(
            RamView {
                bytes: &ram,
                data: Some(&data)
            },
            &none,
            false
        )
        .is_empty());
    // Page 1 was punched unseen above; the next punch epoch finds it,
    // and not the pages that were zero all along.
    assert_eq!(
        d.decide(
            RamView {
                bytes: &ram,
                data: Some(&data)
            },
            &none,
            true
        ),
        [1]
    );
}

// ---- The real kernel, in this process ---------------------------------
//
// The test process plays QEMU: it maps a tmpfs file shared, registers the
// mapping with the same calls the preload makes, and writes it in every
// way QEMU's guest RAM is written (user-mode stores, the kernel copying
// into it on a read(2), O_DIRECT reads, pages first touched after the
// protection began, punches with and without refaults, MADV_REMOVE, a
// write through another mapping logged as external). A replica fed only
// the reported pages must equal the file after every epoch.

struct Ram {
    path: std::path::PathBuf,
    file: File,
    /// "QEMU's" mapping: registered.
    qemu: *mut u8,
    /// tandemd's read mapping (never registered).
    view: *mut u8,
    /// The switch's mapping: writes here are external.
    switch: *mut u8,
    len: usize,
}

// SAFETY: the mappings are plain shared memory, used from one test thread.
unsafe impl Send for Ram {}

impl Ram {
    fn new(pages: usize, tag: &str) -> Ram {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/tandem-uffd-test-{}-{tag}",
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let len = pages * PAGE_SIZE;
        file.set_len(len as u64).unwrap();
        let map = |prot| {
            // SAFETY: a new shared mapping of our own file at an address
            // the kernel picks; unmapped in Drop.
            unsafe {
                mmap(
                    None,
                    NonZeroUsize::new(len).unwrap(),
                    prot,
                    MapFlags::MAP_SHARED,
                    &file,
                    0,
                )
            }
            .expect("mmap")
            .as_ptr()
            .cast::<u8>()
        };
        let rw = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        Ram {
            qemu: map(rw),
            view: map(ProtFlags::PROT_READ),
            switch: map(rw),
            path,
            file,
            len,
        }
    }

    fn view(&self) -> &[u8] {
        // SAFETY: `view` maps `len` bytes for the life of `self`; others
        // write them, which a test reading them between writes tolerates.
        unsafe { std::slice::from_raw_parts(self.view, self.len) }
    }

    fn write(&self, page: usize, at: usize, v: u8) {
        assert!(at < PAGE_SIZE);
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile(self.qemu.add(page * PAGE_SIZE + at), v) };
    }

    fn read(&self, page: usize) -> u8 {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::read_volatile(self.qemu.add(page * PAGE_SIZE + 100)) }
    }

    fn punch(&self, page: usize) {
        nix::fcntl::fallocate(
            self.file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (page * PAGE_SIZE) as i64,
            PAGE_SIZE as i64,
        )
        .expect("punch");
    }

    fn madv_remove(&self, page: usize) {
        // SAFETY: one page of "QEMU's" mapping; its data goes, as intended.
        let ptr = std::ptr::NonNull::new(unsafe { self.qemu.add(page * PAGE_SIZE) }).unwrap();
        // SAFETY: as above.
        unsafe { madvise(ptr.cast(), PAGE_SIZE, MmapAdvise::MADV_REMOVE) }.expect("MADV_REMOVE");
    }

    /// The kernel writes the page on our behalf: read(2) from a pipe.
    fn kernel_write(&self, page: usize, v: u8) {
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, &[v; 64]).unwrap();
        // SAFETY: 64 bytes inside the mapping, written by the kernel.
        let n = unsafe {
            libc::read(
                r.as_raw_fd(),
                self.qemu.add(page * PAGE_SIZE + 256).cast(),
                64,
            )
        };
        assert_eq!(n, 64);
    }

    /// pread(2) of a whole page from another file into the page (what
    /// QEMU's block layer does for a virtio-blk read); O_DIRECT when
    /// `direct` (the kernel pins the page and writes it).
    fn file_read_into(&self, src: &File, page: usize) {
        // SAFETY: one whole page of the mapping, written by the kernel.
        let n = unsafe {
            libc::pread(
                src.as_raw_fd(),
                self.qemu.add(page * PAGE_SIZE).cast(),
                PAGE_SIZE,
                0,
            )
        };
        assert_eq!(n, PAGE_SIZE as isize, "{}", std::io::Error::last_os_error());
    }

    fn switch_write(&self, page: usize, v: u8) {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile(self.switch.add(page * PAGE_SIZE + 3), v) };
    }

    fn contents(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.len];
        self.file.read_exact_at(&mut b, 0).unwrap();
        b
    }

    /// Registers "QEMU's" mapping as the preload does.
    fn register(&self) -> Registration {
        let uffd = sys::uffd_open(sys::UFFD_USER_MODE_ONLY).expect("userfaultfd");
        let features = sys::uffd_api(uffd.as_fd(), sys::WP_FEATURES).expect("UFFDIO_API");
        assert_eq!(features & sys::WP_FEATURES, sys::WP_FEATURES);
        sys::uffd_register_wp(uffd.as_fd(), self.qemu as u64, self.len as u64)
            .expect("UFFDIO_REGISTER");
        Registration {
            uffd,
            pagemap: File::open("/proc/self/pagemap").unwrap(),
            areas: vec![Area {
                start: self.qemu as u64,
                end: self.qemu as u64 + self.len as u64,
                offset: 0,
            }],
            message: "in-process".into(),
            user_mode_only: true,
        }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        for p in [self.qemu, self.view, self.switch] {
            // SAFETY: the mappings made in `new`, used no more.
            let _ = unsafe { munmap(std::ptr::NonNull::new(p).unwrap().cast(), self.len) };
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One collect, checked: the replica, fed only the reported pages, equals
/// the file; and every reported page is one the epoch touched (or the
/// epoch may have seen a punch, or it is the first).
fn epoch(
    t: &mut UffdTracker,
    ram: &Ram,
    replica: &mut [u8],
    touched: &[usize],
    exact: bool,
) -> Vec<u64> {
    // tandemd gives the uffd tracker no hole map (it does not want one);
    // the tracker finds the holes itself when it needs them, and never
    // reads a hole through the mapping (which would allocate it).
    assert!(!t.wants_data_pages());
    let holes_before = data_pages(&ram.file, ram.view()).unwrap();
    let dirty = t.collect(RamView::dense(ram.view())).unwrap();
    assert_eq!(
        data_pages(&ram.file, ram.view()).unwrap(),
        holes_before,
        "the collect allocated holes"
    );
    for &p in &dirty {
        let r = p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE;
        replica[r.clone()].copy_from_slice(&ram.view()[r]);
    }
    let now = ram.contents();
    let missed: Vec<usize> = (0..now.len() / PAGE_SIZE)
        .filter(|&p| {
            now[p * PAGE_SIZE..(p + 1) * PAGE_SIZE] != replica[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
        })
        .collect();
    assert!(
        missed.is_empty(),
        "missed pages {missed:?} (reported {dirty:?})"
    );
    if exact {
        let extra: Vec<u64> = dirty
            .iter()
            .copied()
            .filter(|p| !touched.contains(&(*p as usize)))
            .collect();
        assert!(extra.is_empty(), "reported untouched pages {extra:?}");
    }
    dirty
}

#[test]
fn every_kind_of_write_is_caught_by_the_real_kernel() {
    const N: usize = 64;
    let ram = Ram::new(N, "kinds");
    // Some data before the protection begins.
    for p in 0..32 {
        ram.write(p, 1, p as u8 + 1);
    }
    let mut t = UffdTracker::new(ram.register(), &ram.file, N).unwrap();
    assert_eq!(t.punch_detection(), "inotify");
    let mut replica = vec![0xEEu8; N * PAGE_SIZE];
    assert_eq!(epoch(&mut t, &ram, &mut replica, &[], false).len(), N);
    // Nothing happened: nothing reported. Reads are not writes.
    for p in 0..N {
        ram.read(p);
    }
    assert!(epoch(&mut t, &ram, &mut replica, &[], true).is_empty());

    // User-mode stores, to pages with data and to pages first touched now.
    ram.write(3, 7, 9);
    ram.write(40, 7, 9);
    assert_eq!(epoch(&mut t, &ram, &mut replica, &[3, 40], true), [3, 40]);

    // The kernel writing on the process's behalf: read(2) from a pipe,
    // pread(2) from a file (QEMU's block layer with cache=writeback), and
    // O_DIRECT (the kernel pins the page: cache=none).
    let src_path = ram.path.with_extension("src");
    std::fs::write(&src_path, vec![0x5Au8; PAGE_SIZE]).unwrap();
    let src = File::open(&src_path).unwrap();
    ram.kernel_write(5, 0x33);
    ram.kernel_write(41, 0x33);
    ram.file_read_into(&src, 6);
    ram.file_read_into(&src, 42);
    let mut touched = vec![5, 6, 41, 42];
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&src_path);
    match direct {
        Ok(d) => {
            ram.file_read_into(&d, 7);
            ram.file_read_into(&d, 43);
            touched.extend([7, 43]);
        }
        Err(e) => eprintln!("O_DIRECT unavailable on /dev/shm ({e}): not checked"),
    }
    touched.sort();
    let dirty = epoch(&mut t, &ram, &mut replica, &touched, true);
    assert_eq!(dirty, touched.iter().map(|&p| p as u64).collect::<Vec<_>>());
    let _ = std::fs::remove_file(&src_path);

    // Punches: written in an earlier epoch then punched (no refault), then
    // punched and read back in, then punched and written again; written
    // and punched in the same epoch; MADV_REMOVE. None of those lose a
    // change; pages zero all along are not re-sent.
    ram.write(10, 1, 1);
    ram.write(11, 1, 1);
    ram.write(12, 1, 1);
    epoch(&mut t, &ram, &mut replica, &[10, 11, 12], true);
    ram.punch(10);
    ram.punch(11);
    ram.read(11);
    ram.punch(12);
    ram.write(12, 2, 2);
    ram.write(13, 2, 2);
    ram.punch(13);
    ram.madv_remove(14);
    ram.punch(50); // a page that never held data
    let dirty = epoch(&mut t, &ram, &mut replica, &[10, 11, 12, 13, 14, 50], true);
    assert_eq!(dirty, [10, 11, 12, 13, 14]);
    // A punch, read back in, with the inotify event consumed by an
    // earlier collect: still caught (the event came before the scan).
    ram.punch(15);
    ram.read(15);
    epoch(&mut t, &ram, &mut replica, &[15], true);
    // And the epoch after that is quiet again.
    assert!(epoch(&mut t, &ram, &mut replica, &[], true).is_empty());

    // The switch's writes, through its own mapping: invisible to the page
    // tables, reported through the log.
    ram.switch_write(20, 4);
    ram.switch_write(44, 4);
    t.note_external_writes(&mut [20u64, 44].into_iter());
    assert_eq!(epoch(&mut t, &ram, &mut replica, &[20, 44], true), [20, 44]);

    // mark_all_dirty reports everything once.
    t.mark_all_dirty();
    assert_eq!(epoch(&mut t, &ram, &mut replica, &[], false).len(), N);
    assert!(epoch(&mut t, &ram, &mut replica, &[], true).is_empty());
}

/// Random writes of every kind over many epochs, the replica checked
/// after each (no exactness check: punches re-send zero pages).
#[test]
fn a_random_mix_over_many_epochs_misses_nothing() {
    const N: usize = 256;
    let ram = Ram::new(N, "mix");
    let mut t = UffdTracker::new(ram.register(), &ram.file, N).unwrap();
    let mut replica = vec![0u8; N * PAGE_SIZE];
    epoch(&mut t, &ram, &mut replica, &[], false);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    for e in 0..60 {
        let mut external = Vec::new();
        for _ in 0..next(40) {
            let p = next(N);
            match next(7) {
                0..=2 => ram.write(p, next(PAGE_SIZE), next(255) as u8 + 1),
                3 => ram.kernel_write(p, e as u8),
                4 => ram.punch(p),
                5 => {
                    ram.punch(p);
                    ram.read(p);
                }
                _ => {
                    ram.switch_write(p, e as u8 + 1);
                    external.push(p as u64);
                }
            }
        }
        t.note_external_writes(&mut external.into_iter());
        epoch(&mut t, &ram, &mut replica, &[], false);
    }
}

#[test]
fn a_scan_of_an_unregistered_range_fails_rather_than_says_nothing() {
    let ram = Ram::new(4, "unreg");
    let mut reg = ram.register();
    // Point the tracker at tandemd's own (unregistered) mapping.
    reg.areas[0].start = ram.view as u64;
    reg.areas[0].end = ram.view as u64 + ram.len as u64;
    let err = UffdTracker::new(reg, &ram.file, 4).err().expect("refused");
    assert!(err.to_string().contains("PAGEMAP_SCAN"), "{err}");
}

#[test]
fn addresses_become_file_pages_through_the_areas_offset() {
    let a = Area {
        start: 0x7f00_0000_0000,
        end: 0x7f00_0001_0000,
        offset: 8 * PAGE_SIZE as u64,
    };
    let first = a.offset / PAGE_SIZE as u64;
    assert_eq!(file_page(&a, a.start, first), 8);
    assert_eq!(file_page(&a, a.start + 3 * PAGE_SIZE as u64, first), 11);
    assert_eq!(file_page(&a, a.end, first), 24);
}

/// QEMU may map the RAM file in pieces, from an offset (memory above
/// 4 GiB is the file's tail): a write through a piece is reported at its
/// page of the file, and pages past the file's end are never reported.
#[test]
fn a_mapping_from_an_offset_reports_file_pages() {
    const N: usize = 32;
    let ram = Ram::new(N, "offset");
    // A second "QEMU" mapping: file pages 20..32, registered alone.
    // SAFETY: a new shared mapping of the test's file; unmapped below.
    let piece = unsafe {
        mmap(
            None,
            NonZeroUsize::new(12 * PAGE_SIZE).unwrap(),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            &ram.file,
            (20 * PAGE_SIZE) as i64,
        )
    }
    .expect("mmap")
    .as_ptr()
    .cast::<u8>();
    let mut reg = ram.register();
    sys::uffd_register_wp(reg.uffd.as_fd(), piece as u64, 12 * PAGE_SIZE as u64).unwrap();
    reg.areas = vec![Area {
        start: piece as u64,
        end: piece as u64 + 12 * PAGE_SIZE as u64,
        offset: 20 * PAGE_SIZE as u64,
    }];
    // The tracker is told of 24 pages only: 24..32 lie past its end.
    let mut t = UffdTracker::new(reg, &ram.file, 24).unwrap();
    assert_eq!(t.collect(RamView::dense(ram.view())).unwrap().len(), 24);
    for p in [0, 3, 5, 11] {
        // SAFETY: inside the 12-page piece.
        unsafe { std::ptr::write_volatile(piece.add(p * PAGE_SIZE + 1), 7) };
    }
    assert_eq!(t.collect(RamView::dense(ram.view())).unwrap(), [20, 23]);
    // SAFETY: the mapping made above.
    unsafe {
        munmap(
            std::ptr::NonNull::new(piece).unwrap().cast(),
            12 * PAGE_SIZE,
        )
    }
    .unwrap();
}
