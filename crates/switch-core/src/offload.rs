//! virtio-net checksum and segmentation offload, and its software fallback.
//!
//! A guest that negotiated `VIRTIO_NET_F_CSUM` / `HOST_TSO4` / `HOST_TSO6`
//! hands over TCP segments of up to 64 KiB with the checksum left
//! unfinished (`CHECKSUM_PARTIAL`), described by the virtio-net header in
//! front of the frame. Between two VM ports whose guests both accept that
//! (`GUEST_CSUM` / `GUEST_TSO4` / `GUEST_TSO6`) the switch forwards such a
//! packet as it is and the receiving guest's stack takes it whole: one
//! frame and one header instead of ~44 segments, each checksummed twice in
//! emulated CPU. Every other destination (an uplink, a host port, a guest
//! without the features, the output-commit gate) gets what real hardware
//! would have put on the wire: [`finish`] completes the checksum and cuts
//! the segment into MSS-sized frames.
//!
//! Everything here takes untrusted bytes (a guest wrote them) and never
//! panics; [`from_tx`] validates a header against its frame before the
//! switch accepts the packet, and [`finish`] re-checks what it relies on.

use crate::frame::{self, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HDR};
use crate::port::{MAX_FRAME, MIN_FRAME};

/// `virtio_net_hdr.flags`: the checksum from `csum_start` on is unfinished.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.gso_type` values.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;
/// The part of the header this module reads and writes (without
/// `num_buffers`).
pub const VNET_HDR_FIELDS: usize = 10;

/// Largest frame carried with segmentation offload: a 64 KiB IP packet
/// behind an Ethernet header and one 802.1Q tag.
pub const MAX_GSO_FRAME: usize = 65535 + ETH_HDR + 4;
/// Most segments one packet may be cut into. Linux never uses an MSS below
/// 88 bytes (64 KiB / 88 ≈ 745 segments); the bound keeps a hostile
/// `gso_size` of 1 from turning one packet into 65 535 frames.
pub const MAX_SEGMENTS: usize = 1024;

const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_CWR: u8 = 0x80;

/// The fields of `struct virtio_net_hdr` (little-endian on the wire for
/// virtio 1.0 and for legacy devices on little-endian hosts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// `None` if `b` is shorter than the header.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_FIELDS] = b.get(..VNET_HDR_FIELDS)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn to_bytes(&self) -> [u8; VNET_HDR_FIELDS] {
        let mut b = [0u8; VNET_HDR_FIELDS];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Which offloads a guest's transmit headers may use (what the device
/// side, the switch, accepted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
}

/// Which offloaded packets a guest accepts on receive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxOffloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
}

impl RxOffloads {
    /// Whether a packet carrying `off` can be handed over as it is.
    pub fn accepts(&self, off: &Offload) -> bool {
        let csum_ok = off.csum.is_none() || self.csum;
        let gso_ok = match off.gso {
            None => true,
            Some(Gso {
                kind: GsoKind::Tcp4,
                ..
            }) => self.tso4,
            Some(Gso {
                kind: GsoKind::Tcp6,
                ..
            }) => self.tso6,
        };
        csum_ok && gso_ok
    }

    pub fn any(&self) -> bool {
        self.csum || self.tso4 || self.tso6
    }
}

/// An unfinished checksum. Offsets count from the start of the IP header,
/// so pushing or popping an 802.1Q tag does not move them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialCsum {
    pub start: u16,
    pub offset: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoKind {
    Tcp4,
    Tcp6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    pub kind: GsoKind,
    /// Payload bytes per segment (the MSS).
    pub size: u16,
}

/// The work a packet still needs before it can go on a wire. The default
/// (nothing) is a plain Ethernet frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload {
    pub csum: Option<PartialCsum>,
    pub gso: Option<Gso>,
}

impl Offload {
    pub const NONE: Offload = Offload {
        csum: None,
        gso: None,
    };

    pub fn is_none(&self) -> bool {
        self.csum.is_none() && self.gso.is_none()
    }

    /// Largest frame that may carry this offload.
    pub fn max_frame(&self) -> usize {
        if self.gso.is_some() {
            MAX_GSO_FRAME
        } else {
            MAX_FRAME
        }
    }
}

/// Why a guest's offload request was refused; the frame is dropped as
/// malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("offload not negotiated")]
    NotNegotiated,
    #[error("checksum offsets outside the frame")]
    ChecksumOutside,
    #[error("segmentation of something that is not TCP over IPv4/IPv6")]
    NotTcp,
    #[error("segmentation without a partial checksum")]
    GsoWithoutChecksum,
    #[error("gso_size is zero or yields too many segments")]
    BadSegmentSize,
    #[error("unsupported gso_type {0:#x}")]
    UnsupportedGso(u8),
    #[error("frame size outside the limits")]
    Size,
}

/// Where the IP header starts: after the Ethernet header and the outer
/// 802.1Q tag, if any.
fn l3_offset(frame: &[u8]) -> Option<(usize, u16)> {
    let info = frame::parse(frame)?;
    let l3 = if info.vid.is_some() {
        ETH_HDR + 4
    } else {
        ETH_HDR
    };
    Some((l3, info.ethertype))
}

/// Validates a guest's transmit header against its frame and the offloads
/// it negotiated, and returns what the packet still needs.
pub fn from_tx(hdr: &VnetHdr, frame: &[u8], allowed: TxOffloads) -> Result<Offload, OffloadError> {
    let mut off = Offload::NONE;
    let (l3, ethertype) = l3_offset(frame).ok_or(OffloadError::Size)?;
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        if !allowed.csum {
            return Err(OffloadError::NotNegotiated);
        }
        let start = usize::from(hdr.csum_start);
        let field = start + usize::from(hdr.csum_offset);
        if start < l3 || field + 2 > frame.len() {
            return Err(OffloadError::ChecksumOutside);
        }
        off.csum = Some(PartialCsum {
            start: (start - l3) as u16,
            offset: hdr.csum_offset,
        });
    }
    let kind = match hdr.gso_type {
        VIRTIO_NET_HDR_GSO_NONE => None,
        VIRTIO_NET_HDR_GSO_TCPV4 if allowed.tso4 => Some(GsoKind::Tcp4),
        VIRTIO_NET_HDR_GSO_TCPV6 if allowed.tso6 => Some(GsoKind::Tcp6),
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => {
            return Err(OffloadError::NotNegotiated)
        }
        other => return Err(OffloadError::UnsupportedGso(other)),
    };
    if let Some(kind) = kind {
        let Some(csum) = off.csum else {
            return Err(OffloadError::GsoWithoutChecksum);
        };
        let want = match kind {
            GsoKind::Tcp4 => ETHERTYPE_IPV4,
            GsoKind::Tcp6 => ETHERTYPE_IPV6,
        };
        if ethertype != want || csum.offset != 16 {
            return Err(OffloadError::NotTcp);
        }
        let layout = tcp_layout(frame, l3, kind, usize::from(csum.start) + l3)?;
        let payload = frame.len() - layout.payload;
        let mss = usize::from(hdr.gso_size);
        // Every segment must be a frame the wire (and a guest without
        // offloads) takes.
        if mss == 0 || payload.div_ceil(mss) > MAX_SEGMENTS || layout.payload + mss > MAX_FRAME {
            return Err(OffloadError::BadSegmentSize);
        }
        off.gso = Some(Gso {
            kind,
            size: hdr.gso_size,
        });
    }
    if frame.len() < MIN_FRAME || frame.len() > off.max_frame() {
        return Err(OffloadError::Size);
    }
    Ok(off)
}

/// The header a receiving guest gets for a packet carrying `off`, and the
/// flag/field values a plain frame gets (all zero).
pub fn rx_header(frame: &[u8], off: &Offload) -> VnetHdr {
    let mut h = VnetHdr::default();
    let Some((l3, _)) = l3_offset(frame) else {
        return h;
    };
    if let Some(c) = off.csum {
        h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        h.csum_start = (l3 + usize::from(c.start)) as u16;
        h.csum_offset = c.offset;
    }
    if let (Some(g), Some(c)) = (off.gso, off.csum) {
        h.gso_type = match g.kind {
            GsoKind::Tcp4 => VIRTIO_NET_HDR_GSO_TCPV4,
            GsoKind::Tcp6 => VIRTIO_NET_HDR_GSO_TCPV6,
        };
        h.gso_size = g.size;
        if let Ok(t) = tcp_layout(frame, l3, g.kind, l3 + usize::from(c.start)) {
            h.hdr_len = t.payload as u16;
        }
    }
    h
}

/// Offsets inside one TCP packet.
#[derive(Debug, Clone, Copy)]
struct TcpLayout {
    l3: usize,
    l4: usize,
    /// First payload byte (end of the TCP header).
    payload: usize,
}

fn tcp_layout(
    frame: &[u8],
    l3: usize,
    kind: GsoKind,
    l4: usize,
) -> Result<TcpLayout, OffloadError> {
    match kind {
        GsoKind::Tcp4 => {
            let ip = frame.get(l3..l3 + 20).ok_or(OffloadError::NotTcp)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
            if ip[0] >> 4 != 4 || ihl < 20 || l3 + ihl != l4 || ip[9] != IPPROTO_TCP || frag != 0 {
                return Err(OffloadError::NotTcp);
            }
        }
        GsoKind::Tcp6 => {
            let ip = frame.get(l3..l3 + 40).ok_or(OffloadError::NotTcp)?;
            // Extension headers are allowed (the guest told us where TCP
            // starts), but without them the next header must be TCP.
            if ip[0] >> 4 != 6 || l4 < l3 + 40 || (l4 == l3 + 40 && ip[6] != IPPROTO_TCP) {
                return Err(OffloadError::NotTcp);
            }
        }
    }
    let tcp = frame.get(l4..l4 + 20).ok_or(OffloadError::NotTcp)?;
    let thl = usize::from(tcp[12] >> 4) * 4;
    if thl < 20 || l4 + thl > frame.len() {
        return Err(OffloadError::NotTcp);
    }
    Ok(TcpLayout {
        l3,
        l4,
        payload: l4 + thl,
    })
}

/// The Internet checksum's one's-complement sum of `data`, not yet folded
/// or inverted.
pub fn ones_complement_sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut sum: u64 = chunks
        .by_ref()
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Finishes a checksum left for the hardware (`CHECKSUM_PARTIAL`): the
/// field at `start + offset` holds the pseudo-header sum; the one's
/// complement of the sum of everything from `start` to the end goes there.
/// `false` if the offsets fall outside the frame.
pub fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let Some(field) = start.checked_add(offset) else {
        return false;
    };
    if start > frame.len() || field.saturating_add(2) > frame.len() {
        return false;
    }
    let c = !fold(ones_complement_sum(&frame[start..]));
    // As the kernel does: a computed zero is sent as 0xffff (the same value
    // in one's complement), since zero means "no checksum" for UDP.
    let c = if c == 0 { 0xffff } else { c };
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Turns a packet into the plain frames it stands for: the checksum
/// completed, and a segmentation-offload packet cut into MSS-sized TCP
/// segments with their own IP lengths, IDs, sequence numbers, flags and
/// checksums. Frames are appended to `out`.
pub fn finish(
    mut frame: Vec<u8>,
    off: &Offload,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), OffloadError> {
    let Some(csum) = off.csum else {
        if off.gso.is_some() {
            return Err(OffloadError::GsoWithoutChecksum);
        }
        out.push(frame);
        return Ok(());
    };
    let (l3, _) = l3_offset(&frame).ok_or(OffloadError::Size)?;
    let start = l3 + usize::from(csum.start);
    let Some(gso) = off.gso else {
        if !complete_checksum(&mut frame, start, usize::from(csum.offset)) {
            return Err(OffloadError::ChecksumOutside);
        }
        out.push(frame);
        return Ok(());
    };
    let t = tcp_layout(&frame, l3, gso.kind, start)?;
    let mss = usize::from(gso.size);
    let payload_len = frame.len() - t.payload;
    if mss == 0 || payload_len.div_ceil(mss) > MAX_SEGMENTS {
        return Err(OffloadError::BadSegmentSize);
    }
    let count = payload_len.div_ceil(mss).max(1);
    let header = &frame[..t.payload];
    let seq0 = u32::from_be_bytes(frame[t.l4 + 4..t.l4 + 8].try_into().unwrap_or_default());
    let flags0 = frame[t.l4 + 13];
    let ip_id0 = u16::from_be_bytes([frame[t.l3 + 4], frame[t.l3 + 5]]);
    for i in 0..count {
        let chunk = &frame
            [t.payload + (i * mss).min(payload_len)..t.payload + ((i + 1) * mss).min(payload_len)];
        let mut seg = Vec::with_capacity(header.len() + chunk.len());
        seg.extend_from_slice(header);
        seg.extend_from_slice(chunk);
        let l4_len = seg.len() - t.l4;
        match gso.kind {
            GsoKind::Tcp4 => {
                let ihl = t.l4 - t.l3;
                let total = (ihl + l4_len) as u16;
                seg[t.l3 + 2..t.l3 + 4].copy_from_slice(&total.to_be_bytes());
                let id = ip_id0.wrapping_add(i as u16);
                seg[t.l3 + 4..t.l3 + 6].copy_from_slice(&id.to_be_bytes());
                seg[t.l3 + 10..t.l3 + 12].copy_from_slice(&[0, 0]);
                let c = !fold(ones_complement_sum(&seg[t.l3..t.l4]));
                seg[t.l3 + 10..t.l3 + 12].copy_from_slice(&c.to_be_bytes());
            }
            GsoKind::Tcp6 => {
                let plen = (t.l4 - t.l3 - 40 + l4_len) as u16;
                seg[t.l3 + 4..t.l3 + 6].copy_from_slice(&plen.to_be_bytes());
            }
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[t.l4 + 4..t.l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 < count {
            flags &= !(TCP_FLAG_FIN | TCP_FLAG_PSH);
        }
        if i > 0 {
            flags &= !TCP_FLAG_CWR;
        }
        seg[t.l4 + 13] = flags;
        // The whole checksum, pseudo-header included: the partial value
        // the guest left was for the unsegmented length.
        seg[t.l4 + 16..t.l4 + 18].copy_from_slice(&[0, 0]);
        let mut sum = ones_complement_sum(&seg[t.l4..]);
        sum += match gso.kind {
            GsoKind::Tcp4 => ones_complement_sum(&seg[t.l3 + 12..t.l3 + 20]),
            GsoKind::Tcp6 => ones_complement_sum(&seg[t.l3 + 8..t.l3 + 40]),
        };
        sum += u64::from(IPPROTO_TCP) + l4_len as u64;
        let c = !fold(sum);
        seg[t.l4 + 16..t.l4 + 18].copy_from_slice(&c.to_be_bytes());
        out.push(seg);
    }
    Ok(())
}

#[cfg(test)]
/// An Ethernet + IPv4/IPv6 + TCP packet as a guest with TSO hands it
/// over: the TCP checksum field holds the pseudo-header sum (for the
/// whole length) and the IP header checksum is left as the guest set it.
pub(crate) fn tso_packet(v6: bool, tagged: bool, payload: &[u8], flags: u8) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    if tagged {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
    }
    let l3 = f.len() + 2;
    let l4_len = 20 + payload.len();
    if v6 {
        f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4_len as u16).to_be_bytes());
        f.extend_from_slice(&[IPPROTO_TCP, 64]);
        f.extend_from_slice(&[0xfd; 16]);
        f.extend_from_slice(&[0xfe; 16]);
    } else {
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    }
    let l4 = f.len();
    f.extend_from_slice(&[0x1f, 0x90, 0xc0, 0x01]);
    f.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    f.extend_from_slice(&7u32.to_be_bytes());
    f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    let pseudo = if v6 {
        ones_complement_sum(&f[l3 + 8..l3 + 40])
    } else {
        ones_complement_sum(&f[l3 + 12..l3 + 20])
    } + u64::from(IPPROTO_TCP)
        + l4_len as u64;
    f[l4 + 16..l4 + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hdr(v6: bool, tagged: bool, mss: u16) -> VnetHdr {
        let l3 = if tagged { 18 } else { 14 };
        VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: if v6 {
                VIRTIO_NET_HDR_GSO_TCPV6
            } else {
                VIRTIO_NET_HDR_GSO_TCPV4
            },
            hdr_len: 0,
            gso_size: mss,
            csum_start: l3 + if v6 { 40 } else { 20 },
            csum_offset: 16,
        }
    }

    const ALL: TxOffloads = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
    };

    /// Independent check of a finished segment: IPv4 header checksum and
    /// TCP checksum verify to zero.
    fn verifies(seg: &[u8], v6: bool, l3: usize) -> bool {
        let l4 = l3 + if v6 { 40 } else { 20 };
        let pseudo = if v6 {
            ones_complement_sum(&seg[l3 + 8..l3 + 40])
        } else {
            if fold(ones_complement_sum(&seg[l3..l4])) != 0xffff {
                return false;
            }
            ones_complement_sum(&seg[l3 + 12..l3 + 20])
        } + u64::from(IPPROTO_TCP)
            + (seg.len() - l4) as u64;
        fold(pseudo + ones_complement_sum(&seg[l4..])) == 0xffff
    }

    #[test]
    fn header_round_trips() {
        let h = hdr(true, false, 1448);
        assert_eq!(VnetHdr::parse(&h.to_bytes()), Some(h));
        assert_eq!(VnetHdr::parse(&[0; 9]), None);
    }

    #[test]
    fn refuses_what_was_not_negotiated_or_does_not_fit() {
        let f = tso_packet(false, false, &[1; 3000], 0x18);
        let h = hdr(false, false, 1448);
        assert_eq!(
            from_tx(&h, &f, TxOffloads::default()),
            Err(OffloadError::NotNegotiated)
        );
        assert_eq!(
            from_tx(
                &h,
                &f,
                TxOffloads {
                    csum: true,
                    tso4: false,
                    tso6: true
                }
            ),
            Err(OffloadError::NotNegotiated)
        );
        let mut bad = h;
        bad.csum_start = 4000;
        assert_eq!(from_tx(&bad, &f, ALL), Err(OffloadError::ChecksumOutside));
        let mut bad = h;
        bad.gso_size = 0;
        assert_eq!(from_tx(&bad, &f, ALL), Err(OffloadError::BadSegmentSize));
        let mut bad = h;
        bad.gso_size = 1;
        assert_eq!(from_tx(&bad, &f, ALL), Err(OffloadError::BadSegmentSize));
        let mut bad = h;
        bad.gso_size = 9000; // segments larger than any frame
        assert_eq!(from_tx(&bad, &f, ALL), Err(OffloadError::BadSegmentSize));
        let mut bad = h;
        bad.flags = 0;
        assert_eq!(
            from_tx(&bad, &f, ALL),
            Err(OffloadError::GsoWithoutChecksum)
        );
        let mut bad = h;
        bad.gso_type = 3; // UDP fragmentation offload: never offered
        assert_eq!(from_tx(&bad, &f, ALL), Err(OffloadError::UnsupportedGso(3)));
        // IPv6 segmentation on an IPv4 packet.
        let mut bad = h;
        bad.gso_type = VIRTIO_NET_HDR_GSO_TCPV6;
        assert_eq!(from_tx(&bad, &f, ALL), Err(OffloadError::NotTcp));
        // A plain frame larger than a non-GSO frame may be.
        let mut no_gso = h;
        no_gso.gso_type = 0;
        assert_eq!(from_tx(&no_gso, &f, ALL), Err(OffloadError::Size));
        assert!(from_tx(&h, &f, ALL).is_ok());
    }

    #[test]
    fn segments_carry_their_own_lengths_sequence_and_flags() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let f = tso_packet(false, true, &payload, 0x19); // FIN|PSH|ACK
        let off = from_tx(&hdr(false, true, 1448), &f, ALL).unwrap();
        assert_eq!(
            off.csum,
            Some(PartialCsum {
                start: 20,
                offset: 16
            })
        );
        let mut out = Vec::new();
        finish(f, &off, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let l3 = 18;
        let mut joined = Vec::new();
        for (i, s) in out.iter().enumerate() {
            assert!(verifies(s, false, l3), "segment {i} checksums");
            let total = u16::from_be_bytes([s[l3 + 2], s[l3 + 3]]) as usize;
            assert_eq!(total, s.len() - l3);
            assert_eq!(
                u16::from_be_bytes([s[l3 + 4], s[l3 + 5]]),
                0x1234 + i as u16
            );
            let seq = u32::from_be_bytes(s[l3 + 24..l3 + 28].try_into().unwrap());
            assert_eq!(seq, 0xffff_fff0u32.wrapping_add(1448 * i as u32));
            let flags = s[l3 + 33];
            let last = i == 2;
            assert_eq!(flags & (TCP_FLAG_FIN | TCP_FLAG_PSH) != 0, last);
            joined.extend_from_slice(&s[l3 + 40..]);
        }
        assert_eq!(joined, payload);
        assert_eq!(out[2].len(), l3 + 40 + 3000 - 2 * 1448);
    }

    #[test]
    fn a_partial_checksum_alone_is_completed_in_place() {
        let f = tso_packet(true, false, b"hello", 0x18);
        let mut h = hdr(true, false, 0);
        h.gso_type = 0;
        let off = from_tx(&h, &f, ALL).unwrap();
        assert_eq!(off.gso, None);
        let mut out = Vec::new();
        finish(f.clone(), &off, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert!(verifies(&out[0], true, 14));
        assert!(!verifies(&f, true, 14), "the input was unfinished");
    }

    #[test]
    fn rx_header_describes_the_packet_for_the_receiving_guest() {
        let f = tso_packet(false, false, &[0; 4000], 0x10);
        let h = hdr(false, false, 1448);
        let off = from_tx(&h, &f, ALL).unwrap();
        let rx = rx_header(&f, &off);
        assert_eq!(rx.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!((rx.csum_start, rx.csum_offset), (34, 16));
        assert_eq!((rx.gso_type, rx.gso_size, rx.hdr_len), (1, 1448, 54));
        // Once the tag is pushed, offsets follow the IP header.
        let tagged = frame::push_tag(&f, 5);
        assert_eq!(rx_header(&tagged, &off).csum_start, 38);
        assert_eq!(rx_header(&f, &Offload::NONE), VnetHdr::default());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn segmentation_preserves_the_byte_stream(
            len in 0usize..9000,
            mss in 88u16..1440,
            v6 in any::<bool>(),
            tagged in any::<bool>(),
            seed in any::<u8>(),
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let f = tso_packet(v6, tagged, &payload, 0x10);
            let off = from_tx(&hdr(v6, tagged, mss), &f, ALL).unwrap();
            let mut out = Vec::new();
            finish(f, &off, &mut out).unwrap();
            let l3 = if tagged { 18 } else { 14 };
            let hl = l3 + if v6 { 60 } else { 40 };
            prop_assert_eq!(out.len(), len.div_ceil(usize::from(mss)).max(1));
            let mut joined = Vec::new();
            for s in &out {
                prop_assert!(verifies(s, v6, l3));
                prop_assert!(s.len() - hl <= usize::from(mss));
                joined.extend_from_slice(&s[hl..]);
            }
            prop_assert_eq!(joined, payload);
        }

        #[test]
        fn hostile_headers_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            h in proptest::collection::vec(any::<u8>(), 10),
        ) {
            let h = VnetHdr::parse(&h).unwrap();
            if let Ok(off) = from_tx(&h, &bytes, ALL) {
                let mut out = Vec::new();
                let _ = finish(bytes.clone(), &off, &mut out);
                let _ = rx_header(&bytes, &off);
                for s in out {
                    prop_assert!(s.len() <= bytes.len());
                }
            }
            let mut out = Vec::new();
            let any_off = Offload {
                csum: Some(PartialCsum { start: h.csum_start, offset: h.csum_offset }),
                gso: Some(Gso { kind: GsoKind::Tcp6, size: h.gso_size }),
            };
            let _ = finish(bytes.clone(), &any_off, &mut out);
        }
    }
}
