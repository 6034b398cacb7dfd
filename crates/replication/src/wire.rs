//! The replication wire protocol: framed, versioned, checksummed.
//!
//! Every frame is a 32-byte header and a payload:
//!
//! ```text
//! 0  magic "TDEM"        4  version u16   6  kind u16
//! 8  epoch u64           16 seq u32       20 payload length u32
//! 24 crc32c(payload) u32 28 crc32c(header bytes 0..28) u32
//! ```
//!
//! All integers are little-endian. The header has its own checksum so a
//! corrupt length is caught before it is trusted, and payloads are capped so
//! a hostile or broken peer cannot make the reader allocate without bound.
//!
//! Versions: 1 was the first release. 2 binds a replica to one VM identity:
//! the hello carries the VM's UUID, the primary's generation for it and the
//! primary's instance, and the backup refuses a hello that does not match
//! its replica. 3 makes liveness two-way: a primary heartbeat's epoch field
//! is its stamp (ms since the session's hello, monotonic), and a backup
//! heartbeat's is the newest stamp it has read, which is what keeps the
//! primary from fencing. Frames are laid out as in version 1; a peer of another
//! version is refused at hello, with both versions named (a backup answers
//! an older primary with a `RESYNC` in the primary's own version).

use std::fmt;

pub const MAGIC: [u8; 4] = *b"TDEM";
pub const VERSION: u16 = 3;
/// The oldest version a backup can still answer (to refuse it legibly).
pub const OLDEST_ANSWERED: u16 = 1;
pub const HEADER_LEN: usize = 32;
/// The largest payload accepted. Page frames are built well below it.
pub const MAX_PAYLOAD: usize = 8 * 1024 * 1024;
pub const PAGE_SIZE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Primary → backup, first on a connection: JSON [`Hello`].
    Hello = 1,
    /// Starts an epoch: [`EpochBegin`].
    EpochBegin = 2,
    /// Dirty RAM pages: repeated (page index u64, 4096 bytes).
    Pages = 3,
    /// A chunk of the device-state stream.
    DeviceState = 4,
    /// Ends an epoch: [`EpochEnd`].
    EpochEnd = 5,
    /// Backup → primary: the epoch is applied and durable.
    Committed = 6,
    /// Either way: liveness. From the primary, the epoch field is its stamp
    /// (ms since the session's hello); from the backup, the newest primary
    /// stamp it has read (the echo the primary's fence depends on).
    Heartbeat = 7,
    /// Backup → primary: discard what is in flight and resend from the
    /// epoch after the one named (the last committed).
    Resync = 8,
    /// Disk writes of the epoch, as an encoded write log (see `tandem-nbd`).
    DiskWrites = 9,
    /// Primary → backup: protection is ending on purpose; do not take over.
    Bye = 10,
    /// Primary → backup: the VM's QEMU crashed on the primary (it exited
    /// unexpectedly and nothing runs the guest there); take over now
    /// instead of waiting out the takeover timeout. Payload: u64 ms from
    /// the primary noticing the loss to sending this.
    GuestLost = 11,
    /// Backup → primary, right after the hello answer: a chunk of the
    /// replica RAM's per-page hashes ([`ReplicaDigest`]), so the running
    /// copy sends only pages that differ.
    ReplicaDigest = 12,
    /// Backup → primary: the `Bye` is recorded and the replica disarmed,
    /// so the primary's guest may run on unprotected (without it, a
    /// primary that ends protection keeps its guest fenced).
    ByeAck = 13,
}

impl FrameKind {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::EpochBegin,
            3 => FrameKind::Pages,
            4 => FrameKind::DeviceState,
            5 => FrameKind::EpochEnd,
            6 => FrameKind::Committed,
            7 => FrameKind::Heartbeat,
            8 => FrameKind::Resync,
            9 => FrameKind::DiskWrites,
            10 => FrameKind::Bye,
            11 => FrameKind::GuestLost,
            12 => FrameKind::ReplicaDigest,
            13 => FrameKind::ByeAck,
            _ => return None,
        })
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub epoch: u64,
    /// Position of the frame within its epoch, from 0.
    pub seq: u32,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Frame({:?} epoch={} seq={} {}B)",
            self.kind,
            self.epoch,
            self.seq,
            self.payload.len()
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic {0:02x?}: not a tandem replication stream")]
    BadMagic([u8; 4]),
    #[error("the peer speaks replication protocol version {0}, this side version {VERSION}")]
    Version(u16),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("payload checksum mismatch in {kind:?} frame of epoch {epoch}")]
    PayloadChecksum { kind: FrameKind, epoch: u64 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("malformed {kind:?} payload: {why}")]
    Malformed { kind: FrameKind, why: String },
}

impl Frame {
    /// The human-readable reason a `RESYNC` carries (at most 512 bytes of
    /// it, lossily decoded: it comes from the peer).
    pub fn reason(&self) -> String {
        String::from_utf8_lossy(&self.payload[..self.payload.len().min(512)]).into_owned()
    }

    pub fn new(kind: FrameKind, epoch: u64, seq: u32, payload: Vec<u8>) -> Self {
        Frame {
            kind,
            epoch,
            seq,
            payload,
        }
    }

    /// Encodes the frame. Panics only on a payload over [`MAX_PAYLOAD`],
    /// which this crate never builds (it is a local programming error).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(VERSION)
    }

    /// Encodes the frame in another protocol version's header (the layout
    /// is the same in every version so far): how a backup tells an older
    /// primary why it is refused, in words that primary can read.
    pub fn encode_as(&self, version: u16) -> Vec<u8> {
        assert!(
            self.payload.len() <= MAX_PAYLOAD,
            "frame payload over MAX_PAYLOAD"
        );
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(self.kind as u16).to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&self.payload).to_le_bytes());
        let hcrc = crc32c::crc32c(&out[..28]);
        out.extend_from_slice(&hcrc.to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub epoch: u64,
    pub seq: u32,
    pub len: usize,
    pub payload_crc: u32,
}

/// Validates a 32-byte header. Checks the header checksum before any field
/// is believed.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if crc32c::crc32c(&h[..28]) != u32_at(h, 28) {
        return Err(WireError::HeaderChecksum);
    }
    let version = u16_at(h, 4);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind_raw = u16_at(h, 6);
    let kind = FrameKind::from_u16(kind_raw).ok_or(WireError::UnknownKind(kind_raw))?;
    let len = u32_at(h, 20) as usize;
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    Ok(Header {
        kind,
        epoch: u64_at(h, 8),
        seq: u32_at(h, 16),
        len,
        payload_crc: u32_at(h, 24),
    })
}

/// Checks a payload against its header and builds the frame.
pub fn finish_frame(h: Header, payload: Vec<u8>) -> Result<Frame, WireError> {
    if crc32c::crc32c(&payload) != h.payload_crc {
        return Err(WireError::PayloadChecksum {
            kind: h.kind,
            epoch: h.epoch,
        });
    }
    Ok(Frame {
        kind: h.kind,
        epoch: h.epoch,
        seq: h.seq,
        payload,
    })
}

/// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes
/// are needed; `Ok(Some((frame, used)))` consumed `used` bytes.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&buf[..HEADER_LEN]);
    let header = decode_header(&h)?;
    let total = HEADER_LEN + header.len;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = finish_frame(header, buf[HEADER_LEN..total].to_vec())?;
    Ok(Some((frame, total)))
}

/// Reads one frame from an async stream. `Ok(None)` is a clean EOF at a
/// frame boundary; EOF inside a frame is an `UnexpectedEof` error.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Frame>> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut h[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let header = decode_header(&h).map_err(std::io::Error::other)?;
    let mut payload = vec![0u8; header.len];
    r.read_exact(&mut payload).await?;
    finish_frame(header, payload)
        .map(Some)
        .map_err(std::io::Error::other)
}

pub async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    f: &Frame,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(&f.encode()).await
}

/// The first frame of a connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    pub vm: String,
    /// The VM's identity (its UUID): a replica belongs to one.
    #[serde(default)]
    pub uuid: String,
    /// The primary's generation for this VM: bumped by every handover (a
    /// failover), so a primary from before one is refused.
    #[serde(default)]
    pub generation: u64,
    /// This primary's protection instance: a reconnect of the same instance
    /// replaces its old connection; another instance is refused while the
    /// first is live.
    #[serde(default)]
    pub instance: u64,
    pub ram_size: u64,
    pub page_size: u64,
    /// The VM's spec, so the backup can define the VM it may have to run.
    #[serde(default)]
    pub spec_toml: String,
    /// Replicated disks and their sizes in bytes.
    #[serde(default)]
    pub disks: Vec<HelloDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HelloDisk {
    pub name: String,
    pub size: u64,
}

/// Payload of an `EpochBegin` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochBegin {
    pub ram_size: u64,
    pub page_count: u64,
    pub device_state_len: u64,
}

impl EpochBegin {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&self.ram_size.to_le_bytes());
        v.extend_from_slice(&self.page_count.to_le_bytes());
        v.extend_from_slice(&self.device_state_len.to_le_bytes());
        v
    }
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        if p.len() != 24 {
            return Err(WireError::Malformed {
                kind: FrameKind::EpochBegin,
                why: format!("{} bytes, want 24", p.len()),
            });
        }
        Ok(EpochBegin {
            ram_size: u64_at(p, 0),
            page_count: u64_at(p, 8),
            device_state_len: u64_at(p, 16),
        })
    }
}

/// Payload of an `EpochEnd` frame: what the receiver must have seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEnd {
    /// Frames in the epoch before this one (EpochBegin included).
    pub frames: u32,
    /// crc32c chained over every payload of the epoch, in order.
    pub digest: u32,
}

impl EpochEnd {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8);
        v.extend_from_slice(&self.frames.to_le_bytes());
        v.extend_from_slice(&self.digest.to_le_bytes());
        v
    }
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        if p.len() != 8 {
            return Err(WireError::Malformed {
                kind: FrameKind::EpochEnd,
                why: format!("{} bytes, want 8", p.len()),
            });
        }
        Ok(EpochEnd {
            frames: u32_at(p, 0),
            digest: u32_at(p, 4),
        })
    }
}

/// Payload of a `ReplicaDigest` frame: the xxh3-64 hashes of replica RAM
/// pages `first..first + hashes.len()`, of `total` pages in all. Chunks
/// come in order; `total` 0 says the backup offers no digest (send
/// everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaDigest {
    pub first: u64,
    pub total: u64,
    pub hashes: Vec<u64>,
}

impl ReplicaDigest {
    /// Hashes per frame: the payload stays under [`MAX_PAYLOAD`].
    pub const PER_FRAME: usize = (MAX_PAYLOAD - 16) / 8;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + 8 * self.hashes.len());
        v.extend_from_slice(&self.first.to_le_bytes());
        v.extend_from_slice(&self.total.to_le_bytes());
        for h in &self.hashes {
            v.extend_from_slice(&h.to_le_bytes());
        }
        v
    }

    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let bad = |why: String| WireError::Malformed {
            kind: FrameKind::ReplicaDigest,
            why,
        };
        if p.len() < 16 || !(p.len() - 16).is_multiple_of(8) {
            return Err(bad(format!(
                "{} bytes is not a header and whole hashes",
                p.len()
            )));
        }
        let (first, total) = (u64_at(p, 0), u64_at(p, 8));
        let n = ((p.len() - 16) / 8) as u64;
        if first.checked_add(n).is_none_or(|end| end > total) {
            return Err(bad(format!("pages {first}+{n} run past the total {total}")));
        }
        let hashes = p[16..].chunks_exact(8).map(|c| u64_at(c, 0)).collect();
        Ok(ReplicaDigest {
            first,
            total,
            hashes,
        })
    }

    /// Splits `hashes` (all pages) into frames for `epoch`.
    pub fn frames(epoch: u64, hashes: &[u64]) -> Vec<Frame> {
        let total = hashes.len() as u64;
        if hashes.is_empty() {
            let none = ReplicaDigest {
                first: 0,
                total: 0,
                hashes: Vec::new(),
            };
            return vec![Frame::new(
                FrameKind::ReplicaDigest,
                epoch,
                0,
                none.encode(),
            )];
        }
        hashes
            .chunks(Self::PER_FRAME)
            .enumerate()
            .map(|(i, c)| {
                let d = ReplicaDigest {
                    first: (i * Self::PER_FRAME) as u64,
                    total,
                    hashes: c.to_vec(),
                };
                Frame::new(FrameKind::ReplicaDigest, epoch, i as u32, d.encode())
            })
            .collect()
    }
}

/// Collects a digest's chunks, in order, into one hash per page.
#[derive(Debug, Default)]
pub struct DigestCollector {
    hashes: Vec<u64>,
    total: Option<u64>,
}

impl DigestCollector {
    /// Takes the next chunk. `Ok(true)`: the digest is complete (possibly
    /// empty: the backup offers none).
    pub fn push(&mut self, d: ReplicaDigest) -> Result<bool, WireError> {
        let bad = |why: String| WireError::Malformed {
            kind: FrameKind::ReplicaDigest,
            why,
        };
        if *self.total.get_or_insert(d.total) != d.total {
            return Err(bad(format!("total changed to {}", d.total)));
        }
        if d.first != self.hashes.len() as u64 {
            return Err(bad(format!(
                "chunk starts at page {}, expected {}",
                d.first,
                self.hashes.len()
            )));
        }
        if d.total > 0 && d.hashes.is_empty() {
            return Err(bad("an empty chunk of a non-empty digest".into()));
        }
        self.hashes.extend(d.hashes);
        Ok(self.hashes.len() as u64 == d.total)
    }

    pub fn into_hashes(self) -> Vec<u64> {
        self.hashes
    }
}

/// Splits a `Pages` payload into (page index, page bytes) records.
pub fn page_records(p: &[u8]) -> Result<impl Iterator<Item = (u64, &[u8])>, WireError> {
    const REC: usize = 8 + PAGE_SIZE;
    if p.is_empty() || !p.len().is_multiple_of(REC) {
        return Err(WireError::Malformed {
            kind: FrameKind::Pages,
            why: format!("{} bytes is not a whole number of page records", p.len()),
        });
    }
    Ok(p.chunks_exact(REC).map(|r| (u64_at(r, 0), &r[8..])))
}

/// Pages per `Pages` frame: just under 2 MiB of payload.
pub const PAGES_PER_FRAME: usize = 500;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_goes_in_chunks_and_comes_back_whole() {
        let hashes: Vec<u64> = (0..ReplicaDigest::PER_FRAME as u64 * 2 + 5)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let frames = ReplicaDigest::frames(7, &hashes);
        assert_eq!(frames.len(), 3);
        let mut c = DigestCollector::default();
        let mut done = false;
        for f in &frames {
            assert!(f.payload.len() <= MAX_PAYLOAD);
            assert!(!done);
            done = c.push(ReplicaDigest::decode(&f.payload).unwrap()).unwrap();
        }
        assert!(done);
        assert_eq!(c.into_hashes(), hashes);
        // No replica: one empty chunk, complete at once.
        let none = ReplicaDigest::frames(0, &[]);
        let mut c = DigestCollector::default();
        assert!(c
            .push(ReplicaDigest::decode(&none[0].payload).unwrap())
            .unwrap());
        assert!(c.into_hashes().is_empty());
    }

    #[test]
    fn a_digest_out_of_order_or_past_its_total_is_refused() {
        let chunk = |first, total, n: usize| ReplicaDigest {
            first,
            total,
            hashes: vec![1; n],
        };
        let mut c = DigestCollector::default();
        assert!(c.push(chunk(4, 8, 4)).is_err(), "a gap");
        let mut c = DigestCollector::default();
        assert!(!c.push(chunk(0, 8, 4)).unwrap());
        assert!(c.push(chunk(4, 9, 4)).is_err(), "the total changed");
        let mut c = DigestCollector::default();
        assert!(c.push(chunk(0, 8, 0)).is_err(), "an empty chunk");
        assert!(ReplicaDigest::decode(&chunk(6, 8, 4).encode()).is_err());
        assert!(ReplicaDigest::decode(&chunk(u64::MAX, u64::MAX, 1).encode()).is_err());
        assert!(ReplicaDigest::decode(&[0u8; 20]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn digest_decode_never_panics(p in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            if let Ok(d) = ReplicaDigest::decode(&p) {
                proptest::prop_assert_eq!(d.encode(), p);
            }
        }
    }

    use proptest::prelude::*;

    fn kinds() -> impl Strategy<Value = FrameKind> {
        (1u16..=11).prop_map(|k| FrameKind::from_u16(k).unwrap())
    }

    proptest! {
        #[test]
        fn roundtrip(kind in kinds(), epoch: u64, seq: u32, payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let f = Frame::new(kind, epoch, seq, payload);
            let bytes = f.encode();
            let (g, used) = decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(g, f);
        }

        /// Any prefix of a frame asks for more bytes; it never yields a frame.
        #[test]
        fn truncation_is_never_a_frame(payload in proptest::collection::vec(any::<u8>(), 0..500), cut in 0usize..532) {
            let bytes = Frame::new(FrameKind::Pages, 3, 0, payload).encode();
            let cut = cut.min(bytes.len().saturating_sub(1));
            prop_assert_eq!(decode(&bytes[..cut]), Ok(None));
        }

        /// Flipping any bit of a frame is detected.
        #[test]
        fn any_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..300), bit in 0usize..(331 * 8)) {
            let mut bytes = Frame::new(FrameKind::DeviceState, 9, 2, payload).encode();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            match decode(&bytes) {
                Err(_) => {}
                // A flipped length can make the frame look longer: still no frame.
                Ok(None) => {}
                Ok(Some((f, _))) => prop_assert!(false, "corrupt frame accepted: {f:?}"),
            }
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let _ = EpochBegin::decode(&bytes);
            let _ = EpochEnd::decode(&bytes);
            if let Ok(it) = page_records(&bytes) { it.for_each(drop) }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut bytes = Frame::new(FrameKind::Pages, 1, 0, vec![]).encode();
        bytes[20..24].copy_from_slice(&(u32::MAX).to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..28]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&bytes), Err(WireError::TooLarge(u32::MAX as usize)));
    }

    #[test]
    fn wrong_version_and_magic() {
        let mut bytes = Frame::new(FrameKind::Heartbeat, 0, 0, vec![]).encode();
        bytes[4] = 9;
        let crc = crc32c::crc32c(&bytes[..28]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&bytes), Err(WireError::Version(9)));
        bytes[0] = b'X';
        assert!(matches!(decode(&bytes), Err(WireError::BadMagic(_))));
    }

    #[test]
    fn begin_end_roundtrip() {
        let b = EpochBegin {
            ram_size: 1 << 28,
            page_count: 7,
            device_state_len: 600_000,
        };
        assert_eq!(EpochBegin::decode(&b.encode()), Ok(b));
        let e = EpochEnd {
            frames: 4,
            digest: 0xdead_beef,
        };
        assert_eq!(EpochEnd::decode(&e.encode()), Ok(e));
        assert!(EpochBegin::decode(&[0; 23]).is_err());
    }
}
