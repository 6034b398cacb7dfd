//! Parsers for the `/proc` files the soft-dirty tracker reads. Pure: they
//! take bytes and never panic on any input.

/// One line of `/proc/PID/maps`: a virtual memory area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset into the mapped file, in bytes.
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    pub shared: bool,
}

/// Parses one `maps` line; `None` for anything that is not one.
pub fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut f = line.split_ascii_whitespace();
    let (start, end) = f.next()?.split_once('-')?;
    let perms = f.next()?;
    let offset = f.next()?;
    let (major, minor) = f.next()?.split_once(':')?;
    let inode = f.next()?;
    let m = Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_major: u32::from_str_radix(major, 16).ok()?,
        dev_minor: u32::from_str_radix(minor, 16).ok()?,
        inode: inode.parse().ok()?,
        shared: perms.as_bytes().get(3) == Some(&b's'),
    };
    (m.start < m.end).then_some(m)
}

/// The areas of `maps` that map the file `(major, minor, inode)` shared.
pub fn mappings_of(maps: &str, major: u32, minor: u32, inode: u64) -> Vec<Mapping> {
    maps.lines()
        .filter_map(parse_maps_line)
        .filter(|m| m.shared && m.dev_major == major && m.dev_minor == minor && m.inode == inode)
        .collect()
}

/// One 64-bit `/proc/PID/pagemap` entry (Documentation/admin-guide/mm/pagemap.rst).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    pub fn present(self) -> bool {
        self.0 & (1 << 63) != 0
    }
    pub fn swapped(self) -> bool {
        self.0 & (1 << 62) != 0
    }
    pub fn soft_dirty(self) -> bool {
        self.0 & (1 << 55) != 0
    }
    /// The page frame number of a present page; zero when not present or
    /// when the reader lacks `CAP_SYS_ADMIN`.
    pub fn pfn(self) -> u64 {
        if self.present() {
            self.0 & ((1 << 55) - 1)
        } else {
            0
        }
    }
}

/// Decodes native-endian pagemap entries; a trailing partial entry is
/// ignored.
pub fn pagemap_entries(bytes: &[u8]) -> impl Iterator<Item = PagemapEntry> + '_ {
    bytes.chunks_exact(8).map(|c| {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        PagemapEntry(u64::from_ne_bytes(b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 08:01 1234 /usr/bin/qemu-system-x86_64
7f2c4a000000-7f2c52000000 rw-s 00000000 00:01 2057 /memfd:pc.ram (deleted)
7f2c52000000-7f2c52200000 rw-s 08000000 00:01 2057 /memfd:pc.ram (deleted)
7f2c60000000-7f2c60001000 rw-p 00000000 00:01 2057 /memfd:pc.ram (deleted)
7ffc1000000-7ffc1021000 rw-p 00000000 00:00 0 [stack]
";

    #[test]
    fn finds_the_shared_mappings_of_one_file() {
        let m = mappings_of(MAPS, 0, 1, 2057);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].start, 0x7f2c4a000000);
        assert_eq!(m[0].end - m[0].start, 128 << 20);
        assert_eq!(m[1].offset, 128 << 20);
        assert!(mappings_of(MAPS, 0, 1, 2058).is_empty());
        assert!(mappings_of(MAPS, 8, 1, 1234).is_empty(), "private mapping");
    }

    #[test]
    fn decodes_pagemap_bits() {
        let e = PagemapEntry((1 << 63) | (1 << 55) | 42);
        assert!(e.present() && e.soft_dirty() && !e.swapped());
        assert_eq!(e.pfn(), 42);
        let bytes: Vec<u8> = [e.0, 1 << 62]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .chain([1, 2])
            .collect();
        let v: Vec<_> = pagemap_entries(&bytes).collect();
        assert_eq!(v.len(), 2);
        assert!(v[1].swapped() && !v[1].present());
    }

    proptest! {
        #[test]
        fn never_panics_on_any_line(s in "\\PC{0,120}") {
            let _ = parse_maps_line(&s);
        }

        #[test]
        fn round_trips_well_formed_lines(start in 0u64..1 << 40, len in 1u64..1 << 30, off in any::<u32>(),
                                         major in 0u32..4096, minor in 0u32..1 << 20, inode in any::<u64>(), shared: bool) {
            let line = format!("{:x}-{:x} rw-{} {:08x} {:02x}:{:02x} {} /memfd:x (deleted)",
                start, start + len, if shared { 's' } else { 'p' }, off, major, minor, inode);
            let m = parse_maps_line(&line).unwrap();
            prop_assert_eq!(m, Mapping { start, end: start + len, offset: off as u64, dev_major: major, dev_minor: minor, inode, shared });
        }
    }
}
