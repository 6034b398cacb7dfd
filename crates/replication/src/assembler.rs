//! One epoch on the wire: built by the primary ([`EpochBuilder`]), checked
//! and reassembled by the backup ([`EpochAssembler`]).
//!
//! An epoch is `EpochBegin` (seq 0), then `Pages`, `DeviceState` and
//! `DiskWrites` frames in any order, then `EpochEnd` carrying the number of
//! frames before it and a crc32c chained over all their payloads. The
//! assembler yields a [`CompleteEpoch`] only when every check holds; any
//! violation rejects the whole epoch (the caller resyncs), so a torn,
//! corrupt, duplicated or reordered epoch is never applied.

use crate::wire::{
    self, EpochBegin, EpochEnd, Frame, FrameKind, WireError, PAGES_PER_FRAME, PAGE_SIZE,
};

/// Device-state and disk-write payloads are cut into chunks of this size.
pub const CHUNK: usize = 1 << 20;
/// Largest device-state stream accepted.
pub const MAX_DEVICE_STATE: u64 = 64 << 20;
/// Number of disks an epoch may carry writes for.
pub const MAX_DISKS: u32 = 16;

/// A whole, checked epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteEpoch {
    pub epoch: u64,
    /// Page indices, in the order their data appears in `page_data`.
    pub pages: Vec<u64>,
    pub page_data: Vec<u8>,
    /// Empty for the initial copy, which is RAM only and not yet restorable.
    pub device_state: Vec<u8>,
    /// Encoded [`crate::disklog`] per disk index (missing disks: empty).
    pub disk_writes: Vec<Vec<u8>>,
}

pub struct EpochBuilder;

impl EpochBuilder {
    /// Frames for one epoch. `page_data` holds the pages of `dirty`, in
    /// order; `disk_writes[i]` is disk i's encoded write log. The RAM size
    /// goes into the header so the backup can check it against its replica.
    pub fn build(
        ram_size: u64,
        epoch: u64,
        dirty: &[u64],
        page_data: &[u8],
        device_state: &[u8],
        disk_writes: &[Vec<u8>],
    ) -> Vec<Frame> {
        debug_assert_eq!(page_data.len(), dirty.len() * PAGE_SIZE);
        let mut frames = Vec::new();
        let mut seq = 0u32;
        let mut push = |kind: FrameKind, payload: Vec<u8>| {
            frames.push(Frame::new(kind, epoch, seq, payload));
            seq += 1;
        };
        push(
            FrameKind::EpochBegin,
            EpochBegin {
                ram_size,
                page_count: dirty.len() as u64,
                device_state_len: device_state.len() as u64,
            }
            .encode(),
        );
        for (idx, data) in dirty
            .chunks(PAGES_PER_FRAME)
            .zip(page_data.chunks(PAGES_PER_FRAME * PAGE_SIZE))
        {
            let mut p = Vec::with_capacity(idx.len() * (8 + PAGE_SIZE));
            for (i, page) in idx.iter().zip(data.chunks_exact(PAGE_SIZE)) {
                p.extend_from_slice(&i.to_le_bytes());
                p.extend_from_slice(page);
            }
            push(FrameKind::Pages, p);
        }
        for c in device_state.chunks(CHUNK) {
            push(FrameKind::DeviceState, c.to_vec());
        }
        for (disk, log) in disk_writes.iter().enumerate() {
            for c in log.chunks(CHUNK) {
                let mut p = Vec::with_capacity(4 + c.len());
                p.extend_from_slice(&(disk as u32).to_le_bytes());
                p.extend_from_slice(c);
                push(FrameKind::DiskWrites, p);
            }
        }
        let mut digest = 0u32;
        for f in &frames {
            digest = crc32c::crc32c_append(digest, &f.payload);
        }
        let n = frames.len() as u32;
        frames.push(Frame::new(
            FrameKind::EpochEnd,
            epoch,
            n,
            EpochEnd { frames: n, digest }.encode(),
        ));
        frames
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssemblyError {
    #[error("epoch {got} arrived, expected epoch {want}")]
    WrongEpoch { want: u64, got: u64 },
    #[error("frame {got} of epoch {epoch} arrived, expected frame {want}")]
    OutOfOrder { epoch: u64, want: u32, got: u32 },
    #[error("{0:?} frame where an epoch must begin")]
    NotBegun(FrameKind),
    #[error("unexpected {0:?} frame inside an epoch")]
    Unexpected(FrameKind),
    #[error("epoch is for {got} bytes of RAM, the replica has {want}")]
    RamSize { want: u64, got: u64 },
    #[error("page {page} is outside guest RAM ({pages} pages)")]
    PageOutOfRange { page: u64, pages: u64 },
    #[error("{what}: announced {announced}, received {received}")]
    Count {
        what: &'static str,
        announced: u64,
        received: u64,
    },
    #[error("epoch digest mismatch: frames were lost, altered or replayed")]
    Digest,
    #[error("disk index {0} out of range")]
    Disk(u32),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Reassembles the next expected epoch from frames in arrival order.
pub struct EpochAssembler {
    want_epoch: u64,
    ram_size: u64,
    begun: Option<EpochBegin>,
    next_seq: u32,
    digest: u32,
    pages: Vec<u64>,
    page_data: Vec<u8>,
    device_state: Vec<u8>,
    disk_writes: Vec<Vec<u8>>,
    max_disk_bytes: u64,
    disk_bytes: u64,
}

impl EpochAssembler {
    pub fn new(want_epoch: u64, ram_size: u64) -> Self {
        EpochAssembler {
            want_epoch,
            ram_size,
            begun: None,
            next_seq: 0,
            digest: 0,
            pages: Vec::new(),
            page_data: Vec::new(),
            device_state: Vec::new(),
            disk_writes: Vec::new(),
            max_disk_bytes: u64::MAX,
            disk_bytes: 0,
        }
    }

    /// Caps the disk-write bytes one epoch may carry (e.g. the sum of the
    /// disk sizes plus record overhead), bounding the backup's memory.
    pub fn with_disk_limit(mut self, bytes: u64) -> Self {
        self.max_disk_bytes = bytes;
        self
    }

    /// Feeds one frame. `Ok(Some(_))` when the epoch is complete and valid;
    /// after any error this assembler must be discarded.
    pub fn push(&mut self, f: Frame) -> Result<Option<CompleteEpoch>, AssemblyError> {
        if f.epoch != self.want_epoch {
            return Err(AssemblyError::WrongEpoch {
                want: self.want_epoch,
                got: f.epoch,
            });
        }
        if f.seq != self.next_seq {
            return Err(AssemblyError::OutOfOrder {
                epoch: f.epoch,
                want: self.next_seq,
                got: f.seq,
            });
        }
        let Some(begin) = self.begun else {
            if f.kind != FrameKind::EpochBegin {
                return Err(AssemblyError::NotBegun(f.kind));
            }
            let b = EpochBegin::decode(&f.payload)?;
            if b.ram_size != self.ram_size {
                return Err(AssemblyError::RamSize {
                    want: self.ram_size,
                    got: b.ram_size,
                });
            }
            let pages = self.ram_size / PAGE_SIZE as u64;
            if b.page_count > pages {
                return Err(AssemblyError::Count {
                    what: "pages",
                    announced: b.page_count,
                    received: 0,
                });
            }
            if b.device_state_len > MAX_DEVICE_STATE {
                return Err(AssemblyError::Count {
                    what: "device state bytes",
                    announced: b.device_state_len,
                    received: 0,
                });
            }
            self.pages.reserve(b.page_count as usize);
            self.page_data.reserve(b.page_count as usize * PAGE_SIZE);
            self.digest = crc32c::crc32c_append(0, &f.payload);
            self.next_seq = 1;
            self.begun = Some(b);
            return Ok(None);
        };
        if f.kind != FrameKind::EpochEnd {
            self.digest = crc32c::crc32c_append(self.digest, &f.payload);
        }
        self.next_seq += 1;
        match f.kind {
            FrameKind::Pages => {
                let pages = self.ram_size / PAGE_SIZE as u64;
                for (idx, data) in wire::page_records(&f.payload)? {
                    if idx >= pages {
                        return Err(AssemblyError::PageOutOfRange { page: idx, pages });
                    }
                    if self.pages.len() as u64 >= begin.page_count {
                        return Err(AssemblyError::Count {
                            what: "pages",
                            announced: begin.page_count,
                            received: self.pages.len() as u64 + 1,
                        });
                    }
                    self.pages.push(idx);
                    self.page_data.extend_from_slice(data);
                }
                Ok(None)
            }
            FrameKind::DeviceState => {
                let total = self.device_state.len() as u64 + f.payload.len() as u64;
                if total > begin.device_state_len {
                    return Err(AssemblyError::Count {
                        what: "device state bytes",
                        announced: begin.device_state_len,
                        received: total,
                    });
                }
                self.device_state.extend_from_slice(&f.payload);
                Ok(None)
            }
            FrameKind::DiskWrites => {
                if f.payload.len() < 4 {
                    return Err(WireError::Malformed {
                        kind: FrameKind::DiskWrites,
                        why: "no disk index".into(),
                    }
                    .into());
                }
                let disk =
                    u32::from_le_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
                if disk >= MAX_DISKS {
                    return Err(AssemblyError::Disk(disk));
                }
                self.disk_bytes += f.payload.len() as u64 - 4;
                if self.disk_bytes > self.max_disk_bytes {
                    return Err(AssemblyError::Count {
                        what: "disk write bytes (limit)",
                        announced: self.max_disk_bytes,
                        received: self.disk_bytes,
                    });
                }
                let d = disk as usize;
                if self.disk_writes.len() <= d {
                    self.disk_writes.resize(d + 1, Vec::new());
                }
                self.disk_writes[d].extend_from_slice(&f.payload[4..]);
                Ok(None)
            }
            FrameKind::EpochEnd => {
                let end = EpochEnd::decode(&f.payload)?;
                if end.frames != f.seq {
                    return Err(AssemblyError::Count {
                        what: "frames",
                        announced: u64::from(end.frames),
                        received: u64::from(f.seq),
                    });
                }
                if end.digest != self.digest {
                    return Err(AssemblyError::Digest);
                }
                if self.pages.len() as u64 != begin.page_count {
                    return Err(AssemblyError::Count {
                        what: "pages",
                        announced: begin.page_count,
                        received: self.pages.len() as u64,
                    });
                }
                if self.device_state.len() as u64 != begin.device_state_len {
                    return Err(AssemblyError::Count {
                        what: "device state bytes",
                        announced: begin.device_state_len,
                        received: self.device_state.len() as u64,
                    });
                }
                Ok(Some(CompleteEpoch {
                    epoch: self.want_epoch,
                    pages: std::mem::take(&mut self.pages),
                    page_data: std::mem::take(&mut self.page_data),
                    device_state: std::mem::take(&mut self.device_state),
                    disk_writes: std::mem::take(&mut self.disk_writes),
                }))
            }
            other => Err(AssemblyError::Unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RAM: u64 = 64 * PAGE_SIZE as u64;

    fn sample(epoch: u64, npages: usize, ds: usize) -> (Vec<Frame>, CompleteEpoch) {
        let pages: Vec<u64> = (0..npages as u64)
            .map(|i| (i * 7) % 64)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut data = Vec::new();
        for p in &pages {
            data.extend(std::iter::repeat_n(*p as u8 ^ 0x5a, PAGE_SIZE));
        }
        let state: Vec<u8> = (0..ds).map(|i| (i * 31) as u8).collect();
        let mut log = Vec::new();
        crate::disklog::push(&mut log, 512, b"disk bytes");
        let writes = vec![Vec::new(), log];
        let frames = EpochBuilder::build(RAM, epoch, &pages, &data, &state, &writes);
        let want = CompleteEpoch {
            epoch,
            pages,
            page_data: data,
            device_state: state,
            disk_writes: writes,
        };
        (frames, want)
    }

    fn feed(
        asm: &mut EpochAssembler,
        frames: Vec<Frame>,
    ) -> Result<Option<CompleteEpoch>, AssemblyError> {
        let mut out = None;
        for f in frames {
            if let Some(done) = asm.push(f)? {
                out = Some(done);
            }
        }
        Ok(out)
    }

    #[test]
    fn round_trip() {
        let (frames, want) = sample(3, 40, 3 * CHUNK + 5);
        let mut asm = EpochAssembler::new(3, RAM);
        assert_eq!(feed(&mut asm, frames).unwrap(), Some(want));
    }

    #[test]
    fn wrong_epoch_duplicate_and_reorder_are_rejected() {
        let (frames, _) = sample(3, 10, 100);
        assert!(matches!(
            feed(&mut EpochAssembler::new(4, RAM), frames.clone()),
            Err(AssemblyError::WrongEpoch { want: 4, got: 3 })
        ));
        let mut dup = frames.clone();
        dup.insert(2, frames[1].clone());
        assert!(feed(&mut EpochAssembler::new(3, RAM), dup).is_err());
        let mut swapped = frames.clone();
        swapped.swap(1, 2);
        assert!(feed(&mut EpochAssembler::new(3, RAM), swapped).is_err());
        let truncated = frames[..frames.len() - 1].to_vec();
        assert_eq!(feed(&mut EpochAssembler::new(3, RAM), truncated), Ok(None));
    }

    #[test]
    fn out_of_range_page_is_rejected() {
        let data = vec![0u8; PAGE_SIZE];
        let frames = EpochBuilder::build(RAM, 1, &[64], &data, &[], &[]);
        assert!(matches!(
            feed(&mut EpochAssembler::new(1, RAM), frames),
            Err(AssemblyError::PageOutOfRange { page: 64, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any single altered byte in any encoded frame is caught, either by
        /// the frame checksums or by the epoch's own checks.
        #[test]
        fn a_flipped_byte_never_yields_an_epoch(frame in 0usize..8, at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (frames, _) = sample(1, 5, 3000);
            let frame = frame % frames.len();
            let mut asm = EpochAssembler::new(1, RAM);
            let mut result = Ok(None);
            for (i, f) in frames.into_iter().enumerate() {
                let mut bytes = f.encode();
                if i == frame {
                    let at = at.index(bytes.len());
                    bytes[at] ^= 1 << bit;
                }
                match wire::decode(&bytes) {
                    Ok(Some((f, _))) => {
                        result = asm.push(f);
                        if result.is_err() { break; }
                    }
                    Ok(None) => { result = Ok(None); break; }
                    Err(e) => { result = Err(AssemblyError::Wire(e)); break; }
                }
            }
            prop_assert!(!matches!(result, Ok(Some(_))), "a corrupted epoch was accepted");
        }

        /// Dropping any one frame never yields an epoch.
        #[test]
        fn a_dropped_frame_never_yields_an_epoch(drop in 0usize..8) {
            let (mut frames, _) = sample(1, 5, 3000);
            let drop = drop % frames.len();
            frames.remove(drop);
            let r = feed(&mut EpochAssembler::new(1, RAM), frames);
            prop_assert!(!matches!(r, Ok(Some(_))));
        }
    }
}
