//! TCP acknowledgement clamping for output commit.
//!
//! A `pass` TCP segment leaves the VM at once, but its acknowledgement
//! number and window describe receive state the backup may not have yet:
//! if the primary failed, the peer would already have discarded data that
//! the backup, resuming from the last committed epoch, never received. So
//! the gate rewrites such a segment's ack and window to what the VM had
//! acknowledged as of the last committed epoch. The rewrite fixes the TCP
//! checksum incrementally (RFC 1624, eqn. 3), so it costs the same for a
//! bare ACK and for a full-sized segment, and stays correct for a first
//! fragment whose checksum covers bytes not in this frame.
//!
//! The frame builders at the end are test and fuzzing support: they make
//! well-formed segments with correct checksums without a network stack.

use crate::packet::{IpAddrs, PacketMeta, IPPROTO_TCP, IPPROTO_UDP};

/// Offsets within the TCP header.
const TCP_ACK_AT: usize = 8;
const TCP_WINDOW_AT: usize = 14;
const TCP_CHECKSUM_AT: usize = 16;
const TCP_MIN_HEADER: usize = 20;

/// `a` comes strictly before `b` in sequence space (RFC 793: mod 2^32,
/// within half the space). Two numbers exactly 2^31 apart are ambiguous;
/// each then compares "before" the other, as in every TCP stack.
pub fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a` equals `b` or comes before it in sequence space.
pub fn seq_le(a: u32, b: u32) -> bool {
    a == b || seq_lt(a, b)
}

/// The later of two sequence numbers (`a` when they are 2^31 apart).
pub fn seq_max(a: u32, b: u32) -> u32 {
    if seq_lt(a, b) {
        b
    } else {
        a
    }
}

/// Adds `bytes` as big-endian 16-bit words to a one's-complement
/// accumulator, padding an odd tail with a zero byte (RFC 1071). A `u64`
/// accumulator cannot overflow for any slice this process can hold, so the
/// carries are folded once at the end.
fn add_words(mut acc: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds the carries back in (end-around carry) to a 16-bit one's-
/// complement sum.
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// RFC 1624 eqn. 3 for several words at once: HC' = ~(~HC + Σ~m + Σm').
///
/// Eqn. 3 rather than eqn. 2 (HC' = HC - ~m - m') because it works from
/// the complemented checksum: a field of 0x0000 is then handled like any
/// other value and the result is never 0xFFFF for a valid input, exactly
/// what a full recomputation would store. Equal old and new words leave
/// the checksum unchanged (unless it was the equivalent 0xFFFF, which is
/// normalised to 0x0000).
fn update_checksum(hc: u16, old: &[u16], new: &[u16]) -> u16 {
    let mut acc = u64::from(!hc);
    acc += old.iter().map(|&m| u64::from(!m)).sum::<u64>();
    acc += new.iter().map(|&m| u64::from(m)).sum::<u64>();
    !fold(acc)
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Rewrites the ack number and window of the TCP segment described by
/// `meta` (which must come from [`crate::packet::parse`] of this frame),
/// fixing the TCP checksum incrementally.
///
/// Returns false and leaves the frame untouched when `meta` has no TCP
/// header or that header is not wholly inside the frame. The values are
/// written as given (clamping is the caller's decision); the ACK flag is
/// not changed. `meta` itself is not updated, so its `ack` and `window`
/// describe the frame as it was. A checksum field of 0x0000 is an ordinary
/// TCP checksum value and is updated like any other.
pub fn rewrite_ack(frame: &mut [u8], meta: &PacketMeta, ack: u32, window: u16) -> bool {
    let Some(l4) = meta.l4 else { return false };
    let Some(tcp) = l4.tcp else { return false };
    let Some(end) = l4.offset.checked_add(tcp.header_len.max(TCP_MIN_HEADER)) else {
        return false;
    };
    let Some(header) = frame.get_mut(l4.offset..end) else {
        return false;
    };
    let old = [
        get16(header, TCP_ACK_AT),
        get16(header, TCP_ACK_AT + 2),
        get16(header, TCP_WINDOW_AT),
    ];
    let new = [(ack >> 16) as u16, ack as u16, window];
    if old == new {
        // Nothing to change: leave every byte as it is, including a
        // checksum field that holds the equivalent 0xFFFF.
        return true;
    }
    let hc = update_checksum(get16(header, TCP_CHECKSUM_AT), &old, &new);
    header[TCP_ACK_AT..TCP_ACK_AT + 4].copy_from_slice(&ack.to_be_bytes());
    put16(header, TCP_WINDOW_AT, window);
    put16(header, TCP_CHECKSUM_AT, hc);
    true
}

/// The TCP segment's bounds in the frame and its addresses: from the TCP
/// header to the end of the IP payload (which `parse` puts at
/// `payload_offset + payload_len`), so Ethernet padding after the IP
/// packet is never summed.
fn segment(frame_len: usize, meta: &PacketMeta) -> Option<(usize, usize, IpAddrs)> {
    let ip = meta.ip?;
    let l4 = meta.l4?;
    l4.tcp?;
    let end = meta.payload_offset.checked_add(meta.payload_len)?;
    let min_end = l4.offset.checked_add(TCP_MIN_HEADER)?;
    (min_end <= end && end <= frame_len).then_some((l4.offset, end, ip.addrs))
}

/// The one's-complement sum of the pseudo-header (RFC 793 for IPv4, RFC
/// 8200 §8.1 for IPv6) and the segment, checksum field included as it is.
fn segment_sum(seg: &[u8], addrs: &IpAddrs, proto: u8) -> Option<u64> {
    let mut acc = match addrs {
        IpAddrs::V4 { src, dst } => {
            let len = u16::try_from(seg.len()).ok()?;
            add_words(add_words(0, src), dst) + u64::from(len)
        }
        IpAddrs::V6 { src, dst } => {
            let len = u32::try_from(seg.len()).ok()?;
            add_words(add_words(0, src), dst) + u64::from(len >> 16) + u64::from(len & 0xffff)
        }
    };
    acc += u64::from(proto);
    Some(add_words(acc, seg))
}

/// The TCP timestamp option's TSval: its offset in the frame and value.
/// None when the segment carries no well-formed timestamp option.
pub fn tsval(frame: &[u8], meta: &PacketMeta) -> Option<(usize, u32)> {
    let l4 = meta.l4?;
    let t = l4.tcp?;
    let start = l4.offset.checked_add(TCP_MIN_HEADER)?;
    let end = l4.offset.checked_add(t.header_len)?;
    let opts = frame.get(start..end)?;
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 {
                    return None;
                }
                if kind == 8 && len == 10 {
                    let v = opts.get(i + 2..i + 6)?;
                    return Some((start + i + 2, u32::from_be_bytes([v[0], v[1], v[2], v[3]])));
                }
                i += len;
            }
        }
    }
    None
}

/// Sets the segment's TSval and recomputes its TCP checksum. Output commit
/// uses it on a held segment released after newer segments of the same
/// connection passed: the peer would otherwise drop it as an old duplicate
/// (PAWS, RFC 7323) and the acknowledgement it carries would be lost.
pub fn set_tsval(frame: &mut [u8], meta: &PacketMeta, value: u32) -> bool {
    let Some((at, _)) = tsval(frame, meta) else {
        return false;
    };
    let Some(slot) = frame.get_mut(at..at + 4) else {
        return false;
    };
    slot.copy_from_slice(&value.to_be_bytes());
    fill_tcp_checksum(frame, meta)
}

/// For tests and fuzzing: `frame` (an IPv4 TCP segment from
/// [`build_tcp_frame`]) with NOP, NOP, TS(tsval, 7) options inserted
/// after its 20-byte TCP header, lengths and checksums made whole.
pub fn with_timestamp_option(frame: &[u8], tsval: u32) -> Option<Vec<u8>> {
    let m = crate::packet::parse(frame)?;
    let l4 = m.l4?.offset;
    let l3 = m.l3_offset;
    let mut out = frame.get(..l4 + TCP_MIN_HEADER)?.to_vec();
    out.extend_from_slice(&[1, 1, 8, 10]);
    out.extend_from_slice(&tsval.to_be_bytes());
    out.extend_from_slice(&7u32.to_be_bytes());
    out.extend_from_slice(frame.get(m.payload_offset..m.payload_offset + m.payload_len)?);
    out[l4 + 12] = 8 << 4;
    let total = u16::try_from(out.len() - l3).ok()?;
    out[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
    out[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let mut sum: u32 = 0;
    for c in out[l3..l3 + 20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    out[l3 + 10..l3 + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let m = crate::packet::parse(&out)?;
    fill_tcp_checksum(&mut out, &m).then_some(out)
}

/// The bare acknowledgement a segment carried: its headers (options
/// included) with no payload, the sequence number advanced past the
/// payload, PSH cleared, and lengths and checksums made whole. Output
/// commit sends this at commit for a `pass` segment whose acknowledgement
/// it had to clamp, so the peer hears the VM's real ACK once it is safe.
/// None when `meta` does not describe a whole TCP segment of `frame`.
pub fn bare_ack(frame: &[u8], meta: &PacketMeta) -> Option<Vec<u8>> {
    let ip = meta.ip?;
    let l4 = meta.l4?;
    let t = l4.tcp?;
    let end = meta.payload_offset;
    if end > frame.len() || end < l4.offset + 20 || ip.later_fragment {
        return None;
    }
    let mut out = frame.get(..end)?.to_vec();
    let seq = t.seq.wrapping_add(meta.payload_len as u32);
    out.get_mut(l4.offset + 4..l4.offset + 8)?
        .copy_from_slice(&seq.to_be_bytes());
    *out.get_mut(l4.offset + 13)? &= !crate::packet::TCP_PSH;
    let l3 = meta.l3_offset;
    match ip.addrs {
        crate::packet::IpAddrs::V4 { .. } => {
            let total = u16::try_from(end - l3).ok()?;
            out.get_mut(l3 + 2..l3 + 4)?
                .copy_from_slice(&total.to_be_bytes());
            let ihl = usize::from(out.get(l3)? & 0x0f) * 4;
            out.get_mut(l3 + 10..l3 + 12)?.copy_from_slice(&[0, 0]);
            let mut sum: u32 = 0;
            for c in out.get(l3..l3 + ihl)?.chunks(2) {
                sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            out.get_mut(l3 + 10..l3 + 12)?
                .copy_from_slice(&(!(sum as u16)).to_be_bytes());
        }
        crate::packet::IpAddrs::V6 { .. } => {
            let payload = u16::try_from(end - (l3 + 40)).ok()?;
            out.get_mut(l3 + 4..l3 + 6)?
                .copy_from_slice(&payload.to_be_bytes());
        }
    }
    let m = crate::packet::parse(&out)?;
    if !fill_tcp_checksum(&mut out, &m) {
        return None;
    }
    Some(out)
}

/// Whether the TCP checksum of the segment `meta` describes verifies over
/// its pseudo-header (IPv4 or IPv6). Used by tests, fuzzing and debug
/// assertions. A fragment's checksum covers the reassembled segment, so it
/// generally does not verify here.
pub fn tcp_checksum_valid(frame: &[u8], meta: &PacketMeta) -> bool {
    let Some((start, end, addrs)) = segment(frame.len(), meta) else {
        return false;
    };
    segment_sum(&frame[start..end], &addrs, IPPROTO_TCP).is_some_and(|acc| fold(acc) == 0xffff)
}

/// Computes and stores the full TCP checksum of the segment `meta`
/// describes (for building test segments). Returns false, leaving the
/// frame untouched, when `meta` has no usable TCP segment.
pub fn fill_tcp_checksum(frame: &mut [u8], meta: &PacketMeta) -> bool {
    let Some((start, end, addrs)) = segment(frame.len(), meta) else {
        return false;
    };
    let seg = &mut frame[start..end];
    let old = get16(seg, TCP_CHECKSUM_AT);
    put16(seg, TCP_CHECKSUM_AT, 0);
    let Some(acc) = segment_sum(seg, &addrs, IPPROTO_TCP) else {
        put16(seg, TCP_CHECKSUM_AT, old);
        return false;
    };
    put16(seg, TCP_CHECKSUM_AT, !fold(acc));
    true
}

// ---------------------------------------------------------------------
// Test and fuzzing support.
// ---------------------------------------------------------------------

/// Destination MAC of frames from the builders below.
pub const TEST_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Source MAC of frames from the builders below.
pub const TEST_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// IPv4 source (10.0.0.1) and destination (10.0.0.2) of built frames.
pub const TEST_V4_SRC: [u8; 4] = [10, 0, 0, 1];
pub const TEST_V4_DST: [u8; 4] = [10, 0, 0, 2];
/// IPv6 source (fd00::1) and destination (fd00::2) of built frames.
pub const TEST_V6_SRC: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const TEST_V6_DST: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// Ethernet header plus an IPv4 (20-byte, DF, TTL 64) or IPv6 header for
/// an L4 segment of `l4_len` bytes, header checksum filled in.
fn eth_ip_header(v6: bool, proto: u8, l4_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 40 + l4_len);
    f.extend_from_slice(&TEST_DST_MAC);
    f.extend_from_slice(&TEST_SRC_MAC);
    if v6 {
        let len = u16::try_from(l4_len).expect("payload too large for one IPv6 packet");
        f.extend_from_slice(&crate::packet::ETHERTYPE_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&len.to_be_bytes());
        f.extend_from_slice(&[proto, 64]);
        f.extend_from_slice(&TEST_V6_SRC);
        f.extend_from_slice(&TEST_V6_DST);
    } else {
        let len = u16::try_from(20 + l4_len).expect("payload too large for one IPv4 packet");
        f.extend_from_slice(&crate::packet::ETHERTYPE_IPV4.to_be_bytes());
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&len.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        f.extend_from_slice(&TEST_V4_SRC);
        f.extend_from_slice(&TEST_V4_DST);
        let csum = !fold(add_words(0, &f[14..34]));
        put16(&mut f, 24, csum);
    }
    f
}

/// Test and fuzzing support: a well-formed Ethernet + IPv4/IPv6 + TCP
/// frame (no TCP options, [`TEST_SRC_MAC`] to [`TEST_DST_MAC`], addresses
/// from the `TEST_V4_*`/`TEST_V6_*` constants) with correct IP and TCP
/// checksums. Wrap it with [`insert_vlan_tag`] for a tagged frame.
///
/// # Panics
///
/// When `payload` does not fit in one IP packet (64 KiB).
#[allow(clippy::too_many_arguments)] // One argument per header field a test varies.
pub fn build_tcp_frame(
    v6: bool,
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth_ip_header(v6, IPPROTO_TCP, TCP_MIN_HEADER + payload.len());
    let start = f.len();
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&ack.to_be_bytes());
    f.extend_from_slice(&[0x50, flags]);
    f.extend_from_slice(&window.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    f.extend_from_slice(payload);
    let addrs = if v6 {
        IpAddrs::V6 {
            src: TEST_V6_SRC,
            dst: TEST_V6_DST,
        }
    } else {
        IpAddrs::V4 {
            src: TEST_V4_SRC,
            dst: TEST_V4_DST,
        }
    };
    let acc = segment_sum(&f[start..], &addrs, IPPROTO_TCP).expect("length checked above");
    put16(&mut f, start + TCP_CHECKSUM_AT, !fold(acc));
    f
}

/// Test and fuzzing support: a well-formed Ethernet + IPv4 + UDP frame
/// (same MACs and addresses as [`build_tcp_frame`]) with correct IP and
/// UDP checksums.
///
/// # Panics
///
/// When `payload` does not fit in one IPv4 packet.
pub fn build_udp_frame(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let l4_len = 8 + payload.len();
    let mut f = eth_ip_header(false, IPPROTO_UDP, l4_len);
    let start = f.len();
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&(l4_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let addrs = IpAddrs::V4 {
        src: TEST_V4_SRC,
        dst: TEST_V4_DST,
    };
    let acc = segment_sum(&f[start..], &addrs, IPPROTO_UDP).expect("length checked above");
    // UDP reserves 0x0000 for "no checksum"; a computed zero is sent as
    // its equivalent 0xFFFF.
    let csum = match !fold(acc) {
        0 => 0xffff,
        c => c,
    };
    put16(&mut f, start + 6, csum);
    f
}

/// Test and fuzzing support: `frame` with an 802.1Q tag (priority 0,
/// VLAN `vid & 0xfff`) inserted after the MAC addresses.
///
/// # Panics
///
/// When `frame` is shorter than the 12 bytes of MAC addresses.
pub fn insert_vlan_tag(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(frame.len() + 4);
    f.extend_from_slice(&frame[..12]);
    f.extend_from_slice(&crate::packet::ETHERTYPE_VLAN.to_be_bytes());
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{parse, TCP_ACK, TCP_PSH};
    use proptest::prelude::*;

    fn tcp_of(frame: &[u8]) -> (PacketMeta, crate::packet::TcpMeta) {
        let meta = parse(frame).expect("frame parses");
        let tcp = meta.l4.and_then(|l4| l4.tcp).expect("TCP header parsed");
        (meta, tcp)
    }

    fn checksum_field(frame: &[u8], meta: &PacketMeta) -> u16 {
        get16(frame, meta.l4.unwrap().offset + TCP_CHECKSUM_AT)
    }

    /// The full recomputation of a frame's checksum, for comparing the
    /// incremental result against bit for bit.
    fn recomputed(frame: &[u8], meta: &PacketMeta) -> Vec<u8> {
        let mut copy = frame.to_vec();
        assert!(fill_tcp_checksum(&mut copy, meta));
        copy
    }

    /// A frame whose TCP checksum field is 0x0000: the last payload word
    /// is set to the checksum computed with it zero, which makes the total
    /// sum 0xFFFF and so the stored checksum 0.
    fn frame_with_zero_checksum(v6: bool, ack: u32, window: u16) -> Vec<u8> {
        let mut f = build_tcp_frame(v6, 4000, 80, 7, ack, TCP_ACK, window, &[1, 2, 3, 4, 0, 0]);
        let (meta, _) = tcp_of(&f);
        let c = checksum_field(&f, &meta);
        let at = f.len() - 2;
        put16(&mut f, at, c);
        assert!(fill_tcp_checksum(&mut f, &meta));
        assert_eq!(checksum_field(&f, &meta), 0);
        assert!(tcp_checksum_valid(&f, &meta));
        f
    }

    #[test]
    fn seq_comparisons_wrap() {
        assert!(seq_lt(1, 2));
        assert!(!seq_lt(2, 1));
        assert!(!seq_lt(5, 5));
        assert!(seq_le(5, 5));
        assert!(seq_lt(0xffff_fff0, 0x10));
        assert!(!seq_lt(0x10, 0xffff_fff0));
        assert_eq!(seq_max(0xffff_fff0, 0x10), 0x10);
        assert_eq!(seq_max(0x10, 0xffff_fff0), 0x10);
        assert_eq!(seq_max(7, 7), 7);
    }

    #[test]
    fn builders_produce_valid_checksums() {
        for v6 in [false, true] {
            let f = build_tcp_frame(v6, 1234, 80, 1, 2, TCP_ACK | TCP_PSH, 512, b"hello");
            let (meta, tcp) = tcp_of(&f);
            assert!(tcp_checksum_valid(&f, &meta));
            assert_eq!(recomputed(&f, &meta), f);
            assert_eq!(
                (tcp.seq, tcp.ack, tcp.window, tcp.flags),
                (1, 2, 512, TCP_ACK | TCP_PSH)
            );
        }
        let f = build_tcp_frame(false, 1, 2, 3, 4, 0, 5, &[]);
        assert_eq!(
            fold(add_words(0, &f[14..34])),
            0xffff,
            "IPv4 header checksum"
        );
        let u = build_udp_frame(53, 5353, b"q");
        let meta = parse(&u).unwrap();
        let l4 = meta.l4.unwrap();
        let acc = segment_sum(&u[l4.offset..], &meta.ip.unwrap().addrs, IPPROTO_UDP).unwrap();
        assert_eq!(fold(acc), 0xffff, "UDP checksum");
    }

    #[test]
    fn rewrite_sets_fields_and_matches_full_recompute() {
        for v6 in [false, true] {
            let mut f = build_tcp_frame(v6, 1234, 80, 100, 5000, TCP_ACK, 65535, b"data");
            let (meta, _) = tcp_of(&f);
            assert!(rewrite_ack(&mut f, &meta, 4000, 1024));
            let (meta2, tcp) = tcp_of(&f);
            assert_eq!((tcp.ack, tcp.window), (4000, 1024));
            assert!(tcp_checksum_valid(&f, &meta2));
            assert_eq!(recomputed(&f, &meta2), f);
        }
    }

    #[test]
    fn zero_checksum_field_is_updated_correctly() {
        for v6 in [false, true] {
            // From a zero checksum field...
            let mut f = frame_with_zero_checksum(v6, 9000, 2000);
            let (meta, _) = tcp_of(&f);
            assert!(rewrite_ack(&mut f, &meta, 8000, 1000));
            assert!(tcp_checksum_valid(&f, &meta));
            assert_eq!(recomputed(&f, &meta), f);
            // ...and back to it: the incremental result must be 0x0000,
            // what a full recomputation stores, never 0xFFFF.
            assert!(rewrite_ack(&mut f, &meta, 9000, 2000));
            assert_eq!(checksum_field(&f, &meta), 0);
            assert_eq!(f, frame_with_zero_checksum(v6, 9000, 2000));
        }
    }

    #[test]
    fn all_ones_checksum_field_stays_valid() {
        // 0xFFFF is the one's-complement twin of 0x0000: a receiver accepts
        // it, and an update must keep the segment valid.
        let mut f = frame_with_zero_checksum(false, 9000, 2000);
        let (meta, _) = tcp_of(&f);
        let at = meta.l4.unwrap().offset + TCP_CHECKSUM_AT;
        put16(&mut f, at, 0xffff);
        assert!(tcp_checksum_valid(&f, &meta));
        let before = f.clone();
        assert!(rewrite_ack(&mut f, &meta, 9000, 2000), "identity");
        assert_eq!(f, before, "an identity rewrite touches nothing");
        assert!(rewrite_ack(&mut f, &meta, 1, 2));
        assert!(tcp_checksum_valid(&f, &meta));
        assert_eq!(recomputed(&f, &meta), f);
    }

    #[test]
    fn incremental_identity_keeps_checksum() {
        for hc in [0u16, 1, 0x1234, 0xfffe] {
            assert_eq!(update_checksum(hc, &[0, 0xffff, 7], &[0, 0xffff, 7]), hc);
        }
        assert_eq!(update_checksum(0xffff, &[3], &[3]), 0);
    }

    #[test]
    fn rewrite_refuses_without_tcp_header() {
        let mut u = build_udp_frame(1, 2, b"x");
        let meta = parse(&u).unwrap();
        let before = u.clone();
        assert!(!rewrite_ack(&mut u, &meta, 1, 1));
        assert!(!tcp_checksum_valid(&u, &meta));
        assert!(!fill_tcp_checksum(&mut u, &meta));
        assert_eq!(u, before);

        // A meta describing a header beyond the frame (not from parse of
        // this frame) is refused, not trusted.
        let f = build_tcp_frame(false, 1, 2, 3, 4, TCP_ACK, 5, &[]);
        let (meta, _) = tcp_of(&f);
        let mut short = f[..f.len() - 1].to_vec();
        let before = short.clone();
        assert!(!rewrite_ack(&mut short, &meta, 9, 9));
        assert!(!tcp_checksum_valid(&short, &meta));
        assert!(!fill_tcp_checksum(&mut short, &meta));
        assert_eq!(short, before);
        let mut bogus = meta.clone();
        bogus.l4.as_mut().unwrap().offset = usize::MAX - 4;
        bogus.payload_offset = usize::MAX;
        bogus.payload_len = 10;
        let mut f2 = f.clone();
        assert!(!rewrite_ack(&mut f2, &bogus, 9, 9));
        assert!(!tcp_checksum_valid(&f2, &bogus));
        assert_eq!(f2, f);
    }

    #[test]
    fn checksum_ignores_ethernet_padding_and_covers_vlan_frames() {
        // A bare ACK is padded to the 60-byte Ethernet minimum; the padding
        // must not enter the checksum.
        let mut f = build_tcp_frame(false, 1, 2, 3, 4, TCP_ACK, 5, &[]);
        f.resize(60, 0xaa);
        let (meta, _) = tcp_of(&f);
        assert_eq!(meta.payload_len, 0);
        assert!(tcp_checksum_valid(&f, &meta));
        assert!(rewrite_ack(&mut f, &meta, 77, 88));
        assert!(tcp_checksum_valid(&f, &meta));
        assert!(f[54..].iter().all(|&b| b == 0xaa));

        let mut t = insert_vlan_tag(&build_tcp_frame(true, 1, 2, 3, 4, TCP_ACK, 5, b"v"), 42);
        let (meta, _) = tcp_of(&t);
        assert_eq!(meta.l3_offset, 18);
        assert!(tcp_checksum_valid(&t, &meta));
        assert!(rewrite_ack(&mut t, &meta, 0xdead_beef, 0));
        let (meta, tcp) = tcp_of(&t);
        assert_eq!((tcp.ack, tcp.window), (0xdead_beef, 0));
        assert!(tcp_checksum_valid(&t, &meta));
    }

    #[test]
    fn corrupted_checksum_is_detected() {
        let mut f = build_tcp_frame(true, 1, 2, 3, 4, TCP_ACK, 5, b"abc");
        let (meta, _) = tcp_of(&f);
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(!tcp_checksum_valid(&f, &meta));
    }

    proptest! {
        /// (b) Any rewrite keeps a valid segment valid, sets the fields,
        /// and stores exactly what a full recomputation would.
        #[test]
        fn rewrite_keeps_checksum_valid(
            v6 in any::<bool>(),
            ports in any::<(u16, u16)>(),
            seq in any::<u32>(),
            ack in any::<u32>(),
            flags in any::<u8>(),
            window in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..1500),
            vlan in proptest::option::of(any::<u16>()),
            padding in 0usize..40,
            new_ack in any::<u32>(),
            new_window in any::<u16>(),
        ) {
            let mut f = build_tcp_frame(v6, ports.0, ports.1, seq, ack, flags, window, &payload);
            if let Some(vid) = vlan {
                f = insert_vlan_tag(&f, vid);
            }
            f.resize(f.len() + padding, 0x5a);
            let (meta, _) = tcp_of(&f);
            prop_assert!(tcp_checksum_valid(&f, &meta));
            let len = f.len();
            prop_assert!(rewrite_ack(&mut f, &meta, new_ack, new_window));
            prop_assert_eq!(f.len(), len);
            let (meta2, tcp) = tcp_of(&f);
            prop_assert_eq!((tcp.ack, tcp.window, tcp.seq, tcp.flags), (new_ack, new_window, seq, flags));
            prop_assert!(tcp_checksum_valid(&f, &meta2));
            prop_assert_eq!(recomputed(&f, &meta2), f);
        }

        /// (c) Rewriting with the values already there is an identity.
        #[test]
        fn rewrite_with_original_values_is_identity(
            v6 in any::<bool>(),
            seq in any::<u32>(),
            ack in any::<u32>(),
            window in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            checksum in proptest::option::of(any::<u16>()),
        ) {
            let mut f = build_tcp_frame(v6, 1, 2, seq, ack, TCP_ACK, window, &payload);
            let (meta, tcp) = tcp_of(&f);
            if let Some(c) = checksum {
                // Even a wrong checksum is left alone.
                put16(&mut f, meta.l4.unwrap().offset + TCP_CHECKSUM_AT, c);
            }
            let before = f.clone();
            prop_assert!(rewrite_ack(&mut f, &meta, tcp.ack, tcp.window));
            prop_assert_eq!(f, before);
        }

        /// Rewriting there and back restores every byte, whatever the
        /// checksum field held (0xFFFF aside, which becomes 0x0000): the
        /// incremental update adds no drift of its own.
        #[test]
        fn rewrite_round_trip_restores_frame(
            v6 in any::<bool>(),
            ack in any::<u32>(),
            window in any::<u16>(),
            new_ack in any::<u32>(),
            new_window in any::<u16>(),
            checksum in 0u16..0xffff,
        ) {
            let mut f = build_tcp_frame(v6, 1, 2, 3, ack, TCP_ACK, window, b"rt");
            let (meta, _) = tcp_of(&f);
            put16(&mut f, meta.l4.unwrap().offset + TCP_CHECKSUM_AT, checksum);
            let before = f.clone();
            prop_assert!(rewrite_ack(&mut f, &meta, new_ack, new_window));
            prop_assert!(rewrite_ack(&mut f, &meta, ack, window));
            prop_assert_eq!(f, before);
        }

        /// The incremental update alone (without rewrite_ack's shortcut)
        /// is an identity for equal words on any checksum but 0xFFFF.
        #[test]
        fn incremental_update_identity(hc in 0u16..0xffff, words in any::<[u16; 3]>()) {
            prop_assert_eq!(update_checksum(hc, &words, &words), hc);
        }

        /// (d) Sequence comparisons agree with wrapping arithmetic: b is
        /// after a exactly when b - a (mod 2^32) is in 1..2^31.
        #[test]
        fn seq_consistent_with_wrapping(a in any::<u32>(), d in 1u32..0x8000_0000) {
            let b = a.wrapping_add(d);
            prop_assert!(seq_lt(a, b));
            prop_assert!(!seq_lt(b, a));
            prop_assert!(seq_le(a, b));
            prop_assert!(!seq_le(b, a));
            prop_assert!(seq_le(a, a));
            prop_assert!(!seq_lt(a, a));
            prop_assert_eq!(seq_max(a, b), b);
            prop_assert_eq!(seq_max(b, a), b);
            prop_assert_eq!(seq_max(a, a), a);
        }

        #[test]
        fn seq_lt_matches_signed_difference(a in any::<u32>(), b in any::<u32>()) {
            let diff = b.wrapping_sub(a);
            prop_assert_eq!(seq_lt(a, b), diff != 0 && diff <= 0x8000_0000);
        }
    }
}

#[cfg(test)]
mod bare_ack_tests {
    use super::*;
    use crate::packet::{parse, TCP_ACK, TCP_PSH};

    #[test]
    fn a_bare_ack_keeps_the_acknowledgement_and_drops_the_payload() {
        for v6 in [false, true] {
            let f = build_tcp_frame(
                v6,
                7071,
                40000,
                1000,
                5555,
                TCP_ACK | TCP_PSH,
                300,
                b"RCVD 42\n",
            );
            let m = parse(&f).unwrap();
            let a = bare_ack(&f, &m).unwrap();
            let am = parse(&a).unwrap();
            let t = am.l4.unwrap().tcp.unwrap();
            assert_eq!((t.ack, t.window, t.seq), (5555, 300, 1008));
            assert_eq!(t.flags & TCP_PSH, 0);
            assert_eq!(am.payload_len, 0);
            assert!(tcp_checksum_valid(&a, &am), "v6={v6}");
            assert_eq!(a.len(), m.payload_offset);
        }
    }
}

#[cfg(test)]
mod timestamp_tests {
    use super::*;
    use crate::packet::{parse, TCP_ACK};

    fn with_timestamps(tsval: u32) -> Vec<u8> {
        with_timestamp_option(
            &build_tcp_frame(false, 7070, 40000, 1, 2, TCP_ACK, 100, b""),
            tsval,
        )
        .unwrap()
    }

    #[test]
    fn the_timestamp_is_found_and_rewritten_with_a_valid_checksum() {
        let mut f = with_timestamps(1000);
        let m = parse(&f).unwrap();
        assert_eq!(tsval(&f, &m).map(|t| t.1), Some(1000));
        assert!(set_tsval(&mut f, &m, 5000));
        let m = parse(&f).unwrap();
        assert_eq!(tsval(&f, &m).map(|t| t.1), Some(5000));
        assert!(tcp_checksum_valid(&f, &m));
        let plain = build_tcp_frame(false, 1, 2, 3, 4, TCP_ACK, 5, b"x");
        assert_eq!(tsval(&plain, &parse(&plain).unwrap()), None);
    }
}
