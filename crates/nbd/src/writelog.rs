//! The writes of one replication epoch, in the order the export applied
//! them, and their compact serialised form.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use crate::zero::zero_range;

/// One write the guest (through QEMU's mirror) made to the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskWrite {
    /// `data` was written at `offset` (NBD_CMD_WRITE).
    Data { offset: u64, data: Vec<u8> },
    /// `len` bytes at `offset` now read as zeroes (NBD_CMD_WRITE_ZEROES and
    /// NBD_CMD_TRIM). Kept as a length, not a buffer: a single TRIM may
    /// cover gigabytes.
    Zero { offset: u64, len: u64 },
}

impl DiskWrite {
    pub fn offset(&self) -> u64 {
        match self {
            Self::Data { offset, .. } | Self::Zero { offset, .. } => *offset,
        }
    }

    /// Bytes of disk the write covers.
    pub fn len(&self) -> u64 {
        match self {
            Self::Data { data, .. } => data.len() as u64,
            Self::Zero { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of payload carried in memory and on the wire.
    pub fn payload_len(&self) -> u64 {
        match self {
            Self::Data { data, .. } => data.len() as u64,
            Self::Zero { .. } => 0,
        }
    }

    /// Applies this write to `file` at its offset.
    pub fn apply_to(&self, file: &File) -> io::Result<()> {
        match self {
            Self::Data { offset, data } => file.write_all_at(data, *offset),
            Self::Zero { offset, len } => {
                let end = offset.checked_add(*len).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "zero range overflows")
                })?;
                // Zeroing keeps the file size, but a data write there would
                // have grown the file; grow it too so both kinds agree.
                let size = file.metadata()?.len();
                if end > size {
                    file.set_len(end)?;
                }
                if *offset < size {
                    zero_range(file, *offset, size.min(end) - offset, true)?;
                }
                Ok(())
            }
        }
    }
}

/// All writes recorded since the previous [`Export::take_writes`], in
/// the order they reached the backing file.
///
/// [`Export::take_writes`]: crate::Export::take_writes
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteLog {
    writes: Vec<DiskWrite>,
    bytes: u64,
}

/// Why a serialised [`WriteLog`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("write log truncated: {0} bytes is shorter than the fixed header and trailer")]
    Short(usize),
    #[error("not a write log (bad magic)")]
    Magic,
    #[error("write log version {0} is not supported")]
    Version(u32),
    #[error("write log checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("write log record {index} is malformed: {why}")]
    Record { index: u64, why: &'static str },
    #[error("write log has {0} bytes after its last record")]
    Trailing(usize),
}

const MAGIC: &[u8; 8] = b"TNBDWLOG";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8;
const TRAILER_LEN: usize = 4;
const RECORD_HEAD_LEN: usize = 1 + 8 + 8;
const TAG_DATA: u8 = 1;
const TAG_ZERO: u8 = 2;

/// Adjacent data extents are merged by [`WriteLog::coalesced`] only up to
/// this size: merging saves a 17-byte record head, so beyond a megabyte it
/// would only buy large reallocation copies.
const MERGE_LIMIT: usize = 1 << 20;

impl WriteLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a write; empty writes change nothing and are dropped.
    pub fn push(&mut self, w: DiskWrite) {
        if w.is_empty() {
            return;
        }
        self.bytes += w.payload_len();
        self.writes.push(w);
    }

    /// Appends all of `later`'s writes after this log's.
    pub fn extend(&mut self, later: WriteLog) {
        self.bytes += later.bytes;
        self.writes.extend(later.writes);
    }

    pub fn writes(&self) -> &[DiskWrite] {
        &self.writes
    }

    pub fn into_writes(self) -> Vec<DiskWrite> {
        self.writes
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Payload bytes held (zero writes carry none).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of disk covered, counting overlaps as often as they occur.
    pub fn extent_bytes(&self) -> u64 {
        self.writes.iter().map(DiskWrite::len).sum()
    }

    /// The same effect in fewer, sorted, non-overlapping writes: later
    /// writes overwrite earlier ones where they overlap, and touching
    /// extents of the same kind are merged (data up to 1 MiB per write).
    /// Applying the result to any file leaves it exactly as applying the
    /// original in order would.
    pub fn coalesced(self) -> WriteLog {
        let mut map: BTreeMap<u64, Piece> = BTreeMap::new();
        for w in self.writes {
            let (start, piece) = match w {
                DiskWrite::Data { offset, data } => (offset, Piece::Data(data)),
                DiskWrite::Zero { offset, len } => (offset, Piece::Zero(len)),
            };
            overlay(&mut map, start, piece);
        }
        let mut out = WriteLog::new();
        let mut cur: Option<(u64, Piece)> = None;
        for (start, piece) in map {
            cur = match cur {
                None => Some((start, piece)),
                Some((cs, cp)) => {
                    if cs.checked_add(cp.len()) == Some(start) {
                        match (cp, piece) {
                            (Piece::Zero(a), Piece::Zero(b)) => Some((cs, Piece::Zero(a + b))),
                            (Piece::Data(mut a), Piece::Data(b))
                                if a.len() + b.len() <= MERGE_LIMIT =>
                            {
                                a.extend_from_slice(&b);
                                Some((cs, Piece::Data(a)))
                            }
                            (cp, piece) => {
                                out.push(cp.into_write(cs));
                                Some((start, piece))
                            }
                        }
                    } else {
                        out.push(cp.into_write(cs));
                        Some((start, piece))
                    }
                }
            };
        }
        if let Some((cs, cp)) = cur {
            out.push(cp.into_write(cs));
        }
        out
    }

    /// Size of [`encode`](Self::encode)'s output.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + TRAILER_LEN
            + self
                .writes
                .iter()
                .map(|w| RECORD_HEAD_LEN + w.payload_len() as usize)
                .sum::<usize>()
    }

    /// Serialises the log:
    ///
    /// ```text
    /// "TNBDWLOG"  u32 version=1  u64 count
    /// count × ( u8 tag (1 data, 2 zero)  u64 offset  u64 len  [len bytes if data] )
    /// u32 crc32c of everything before it
    /// ```
    ///
    /// All integers big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Like [`encode`](Self::encode), appending to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.reserve(self.encoded_len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&(self.writes.len() as u64).to_be_bytes());
        for w in &self.writes {
            match w {
                DiskWrite::Data { offset, data } => {
                    out.push(TAG_DATA);
                    out.extend_from_slice(&offset.to_be_bytes());
                    out.extend_from_slice(&(data.len() as u64).to_be_bytes());
                    out.extend_from_slice(data);
                }
                DiskWrite::Zero { offset, len } => {
                    out.push(TAG_ZERO);
                    out.extend_from_slice(&offset.to_be_bytes());
                    out.extend_from_slice(&len.to_be_bytes());
                }
            }
        }
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    /// Parses what [`encode`](Self::encode) produced. Never panics and
    /// never allocates more than the input's size, whatever the input.
    pub fn decode(b: &[u8]) -> Result<WriteLog, DecodeError> {
        if b.len() < HEADER_LEN + TRAILER_LEN {
            return Err(DecodeError::Short(b.len()));
        }
        if &b[..8] != MAGIC {
            return Err(DecodeError::Magic);
        }
        let version = u32::from_be_bytes(b[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let (body, trailer) = b.split_at(b.len() - TRAILER_LEN);
        let stored = u32::from_be_bytes(trailer.try_into().unwrap_or_default());
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(DecodeError::Checksum { stored, computed });
        }
        let count = u64::from_be_bytes(b[12..20].try_into().unwrap_or_default());
        let mut rest = &body[HEADER_LEN..];
        // The count is checked data, but a bound by the input size keeps a
        // crafted count with a valid checksum from reserving memory.
        let cap = usize::try_from(count)
            .unwrap_or(usize::MAX)
            .min(rest.len() / RECORD_HEAD_LEN);
        let mut log = WriteLog {
            writes: Vec::with_capacity(cap),
            bytes: 0,
        };
        for index in 0..count {
            let bad = |why| DecodeError::Record { index, why };
            if rest.len() < RECORD_HEAD_LEN {
                return Err(bad("truncated record head"));
            }
            let tag = rest[0];
            let offset = u64::from_be_bytes(rest[1..9].try_into().unwrap_or_default());
            let len = u64::from_be_bytes(rest[9..17].try_into().unwrap_or_default());
            rest = &rest[RECORD_HEAD_LEN..];
            if len == 0 {
                return Err(bad("empty write"));
            }
            if offset.checked_add(len).is_none() {
                return Err(bad("range overflows"));
            }
            let w = match tag {
                TAG_DATA => {
                    let n = usize::try_from(len)
                        .ok()
                        .filter(|&n| n <= rest.len())
                        .ok_or_else(|| bad("data runs past the end"))?;
                    let (data, tail) = rest.split_at(n);
                    rest = tail;
                    DiskWrite::Data {
                        offset,
                        data: data.to_vec(),
                    }
                }
                TAG_ZERO => DiskWrite::Zero { offset, len },
                _ => return Err(bad("unknown tag")),
            };
            log.push(w);
        }
        if !rest.is_empty() {
            return Err(DecodeError::Trailing(rest.len()));
        }
        Ok(log)
    }

    /// Applies every write to `file`, in order: what the backup does when
    /// the epoch commits. Not synced; the caller decides when to fsync.
    pub fn apply_to(&self, file: &File) -> io::Result<()> {
        self.writes.iter().try_for_each(|w| w.apply_to(file))
    }
}

/// A write's content while coalescing, keyed by its start offset.
enum Piece {
    Data(Vec<u8>),
    Zero(u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Data(d) => d.len() as u64,
            Piece::Zero(n) => *n,
        }
    }

    /// Splits at `at` (≤ len) into the head and the tail.
    fn split_at(self, at: u64) -> (Piece, Piece) {
        match self {
            Piece::Data(mut d) => {
                let tail = d.split_off(at as usize);
                (Piece::Data(d), Piece::Data(tail))
            }
            Piece::Zero(n) => (Piece::Zero(at), Piece::Zero(n - at)),
        }
    }

    fn into_write(self, offset: u64) -> DiskWrite {
        match self {
            Piece::Data(data) => DiskWrite::Data { offset, data },
            Piece::Zero(len) => DiskWrite::Zero { offset, len },
        }
    }
}

/// Lays `piece` over the non-overlapping extents in `map`, trimming or
/// dropping whatever it covers.
fn overlay(map: &mut BTreeMap<u64, Piece>, start: u64, mut piece: Piece) {
    // A range running past u64::MAX cannot be applied anyway; clip it so
    // the arithmetic below stays exact.
    let room = u64::MAX - start;
    if piece.len() > room {
        piece = piece.split_at(room).0;
    }
    if piece.len() == 0 {
        return;
    }
    let end = start + piece.len();
    let mut hit: Vec<u64> = Vec::new();
    if let Some((&s, p)) = map.range(..start).next_back() {
        if s + p.len() > start {
            hit.push(s);
        }
    }
    hit.extend(map.range(start..end).map(|(&s, _)| s));
    for s in hit {
        let Some(mut p) = map.remove(&s) else {
            continue;
        };
        let e = s + p.len();
        let mut s2 = s;
        if s < start {
            let (head, tail) = p.split_at(start - s);
            map.insert(s, head);
            p = tail;
            s2 = start;
        }
        if e > end {
            let (_, tail) = p.split_at(end - s2);
            map.insert(end, tail);
        }
    }
    map.insert(start, piece);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(offset: u64, bytes: &[u8]) -> DiskWrite {
        DiskWrite::Data {
            offset,
            data: bytes.to_vec(),
        }
    }

    /// The reference semantics: apply in order to a memory image.
    fn apply_model(log: &WriteLog, img: &mut Vec<u8>) {
        for w in log.writes() {
            let end = (w.offset() + w.len()) as usize;
            if img.len() < end {
                img.resize(end, 0);
            }
            let o = w.offset() as usize;
            match w {
                DiskWrite::Data { data, .. } => img[o..end].copy_from_slice(data),
                DiskWrite::Zero { .. } => img[o..end].fill(0),
            }
        }
    }

    #[test]
    fn push_tracks_bytes_and_drops_empty() {
        let mut l = WriteLog::new();
        l.push(data(0, b"abc"));
        l.push(data(10, b""));
        l.push(DiskWrite::Zero { offset: 0, len: 0 });
        l.push(DiskWrite::Zero {
            offset: 5,
            len: 1 << 40,
        });
        assert_eq!(l.len(), 2);
        assert_eq!(l.bytes(), 3);
        assert_eq!(l.extent_bytes(), 3 + (1 << 40));
    }

    #[test]
    fn coalesce_overlaps_and_merges() {
        let mut l = WriteLog::new();
        l.push(data(0, b"aaaa"));
        l.push(data(2, b"bb"));
        l.push(data(4, b"cc"));
        l.push(DiskWrite::Zero { offset: 10, len: 2 });
        l.push(DiskWrite::Zero { offset: 12, len: 3 });
        l.push(data(11, b"d"));
        let c = l.coalesced();
        assert_eq!(
            c.writes(),
            &[
                data(0, b"aabbcc"),
                DiskWrite::Zero { offset: 10, len: 1 },
                data(11, b"d"),
                DiskWrite::Zero { offset: 12, len: 3 },
            ]
        );
        assert_eq!(c.bytes(), 7);
    }

    #[test]
    fn coalesce_write_inside_larger_one() {
        let mut l = WriteLog::new();
        l.push(data(0, b"xxxxxxxx"));
        l.push(DiskWrite::Zero { offset: 3, len: 2 });
        let c = l.coalesced();
        assert_eq!(
            c.writes(),
            &[
                data(0, b"xxx"),
                DiskWrite::Zero { offset: 3, len: 2 },
                data(5, b"xxx"),
            ]
        );
    }

    #[test]
    fn coalesce_clips_ranges_past_u64_max() {
        let mut l = WriteLog::new();
        l.push(DiskWrite::Zero {
            offset: u64::MAX - 1,
            len: 10,
        });
        l.push(data(u64::MAX - 2, b"abc"));
        let c = l.coalesced();
        assert_eq!(c.writes(), &[data(u64::MAX - 2, b"ab")]);
    }

    #[test]
    fn encode_decode_and_corruption() {
        let mut l = WriteLog::new();
        l.push(data(4096, &[0xab; 100]));
        l.push(DiskWrite::Zero {
            offset: 0,
            len: 1 << 33,
        });
        let b = l.encode();
        assert_eq!(b.len(), l.encoded_len());
        assert_eq!(WriteLog::decode(&b).unwrap(), l);

        let mut bad = b.clone();
        bad[40] ^= 0x10;
        assert!(matches!(
            WriteLog::decode(&bad),
            Err(DecodeError::Checksum { .. })
        ));
        assert!(matches!(
            WriteLog::decode(&b[..b.len() - 1]),
            Err(DecodeError::Checksum { .. })
        ));
        assert_eq!(WriteLog::decode(&b[..3]), Err(DecodeError::Short(3)));
        assert_eq!(
            WriteLog::decode(&WriteLog::new().encode()).unwrap(),
            WriteLog::new()
        );
    }

    /// Re-seals a hand-edited body so only structural checks can fail.
    fn seal(mut body: Vec<u8>) -> Vec<u8> {
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        body
    }

    #[test]
    fn decode_rejects_structural_lies() {
        let mut l = WriteLog::new();
        l.push(data(1, b"xy"));
        let good = l.encode();
        let body = &good[..good.len() - 4];

        // Count says two records, only one present.
        let mut b = body.to_vec();
        b[19] = 2;
        assert!(matches!(
            WriteLog::decode(&seal(b)),
            Err(DecodeError::Record { index: 1, .. })
        ));
        // Data length past the end.
        let mut b = body.to_vec();
        b[HEADER_LEN + 16] = 9;
        assert!(matches!(
            WriteLog::decode(&seal(b)),
            Err(DecodeError::Record { index: 0, .. })
        ));
        // Unknown tag.
        let mut b = body.to_vec();
        b[HEADER_LEN] = 7;
        assert!(matches!(
            WriteLog::decode(&seal(b)),
            Err(DecodeError::Record { index: 0, .. })
        ));
        // Trailing garbage.
        let mut b = body.to_vec();
        b.push(0);
        assert_eq!(WriteLog::decode(&seal(b)), Err(DecodeError::Trailing(1)));
        // Huge count with a valid checksum must not allocate or panic.
        let mut b = body.to_vec();
        b[12..20].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(WriteLog::decode(&seal(b)).is_err());
    }

    #[test]
    fn apply_to_file_grows_for_trailing_zeroes() {
        let f = tempfile::tempfile().unwrap();
        let mut l = WriteLog::new();
        l.push(data(0, &[1u8; 10]));
        l.push(DiskWrite::Zero { offset: 5, len: 20 });
        l.apply_to(&f).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 25);
        let mut b = vec![0xeeu8; 25];
        f.read_exact_at(&mut b, 0).unwrap();
        let mut want = vec![1u8; 5];
        want.resize(25, 0);
        assert_eq!(b, want);
    }

    fn arb_write() -> impl Strategy<Value = DiskWrite> {
        prop_oneof![
            (0u64..200, proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(offset, data)| DiskWrite::Data { offset, data }),
            (0u64..200, 0u64..60).prop_map(|(offset, len)| DiskWrite::Zero { offset, len }),
        ]
    }

    fn arb_log() -> impl Strategy<Value = WriteLog> {
        proptest::collection::vec(arb_write(), 0..30).prop_map(|ws| {
            let mut l = WriteLog::new();
            ws.into_iter().for_each(|w| l.push(w));
            l
        })
    }

    proptest! {
        #[test]
        fn coalesce_preserves_effect(log in arb_log(), fill in any::<u8>()) {
            let mut want = vec![fill; 300];
            apply_model(&log, &mut want);
            let c = log.coalesced();
            let mut got = vec![fill; 300];
            apply_model(&c, &mut got);
            prop_assert_eq!(got, want);
            // Sorted, non-overlapping, no empty writes.
            for pair in c.writes().windows(2) {
                prop_assert!(pair[0].offset() + pair[0].len() <= pair[1].offset());
            }
            prop_assert!(c.writes().iter().all(|w| !w.is_empty()));
            prop_assert_eq!(c.bytes(), c.writes().iter().map(DiskWrite::payload_len).sum::<u64>());
        }

        #[test]
        fn encode_round_trips(log in arb_log()) {
            prop_assert_eq!(WriteLog::decode(&log.encode()).unwrap(), log);
        }

        #[test]
        fn apply_to_file_matches_model(log in arb_log()) {
            let f = tempfile::tempfile().unwrap();
            f.write_all_at(&[0x5a; 300], 0).unwrap();
            log.apply_to(&f).unwrap();
            let mut want = vec![0x5a; 300];
            apply_model(&log, &mut want);
            let mut got = vec![0u8; 300];
            f.read_exact_at(&mut got, 0).unwrap();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn random_bytes_never_panic_decode(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = WriteLog::decode(&b);
        }

        #[test]
        fn sealed_random_bodies_never_panic_decode(
            tail in proptest::collection::vec(any::<u8>(), 0..200),
            count in any::<u64>(),
        ) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&VERSION.to_be_bytes());
            b.extend_from_slice(&count.to_be_bytes());
            b.extend_from_slice(&tail);
            let _ = WriteLog::decode(&seal(b));
        }
    }
}
