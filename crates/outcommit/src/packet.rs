//! Parsing what the gate needs from an Ethernet frame a VM sent.
//!
//! Every offset is bounds-checked: a frame is guest-controlled bytes, and a
//! truncated or lying header yields less metadata, never a panic.

/// Whether a frame was originated by the protected VM itself (its source
/// MAC is one of the VM's NIC addresses) or forwarded by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    Vm,
    Forwarded,
}

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// The parsed view of one frame. Offsets are into the frame as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PacketMeta {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The ethertype after any 802.1Q tag.
    pub ethertype: u16,
    /// Offset of the L3 header (14, or 18 behind a VLAN tag).
    pub l3_offset: usize,
    pub ip: Option<IpMeta>,
    /// Present when the IP payload is a whole (unfragmented or first
    /// fragment) TCP or UDP header.
    pub l4: Option<L4Meta>,
    /// Offset and length of the L4 payload (or of the L3 payload when
    /// there is no L4 header parsed).
    pub payload_offset: usize,
    pub payload_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpAddrs {
    V4 { src: [u8; 4], dst: [u8; 4] },
    V6 { src: [u8; 16], dst: [u8; 16] },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpMeta {
    pub proto: u8,
    pub addrs: IpAddrs,
    /// True for a non-first fragment: no L4 header to look at.
    pub later_fragment: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4Meta {
    pub src_port: u16,
    pub dst_port: u16,
    /// Offset of the L4 header in the frame.
    pub offset: usize,
    pub tcp: Option<TcpMeta>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpMeta {
    pub seq: u32,
    pub ack: u32,
    /// The low 8 flag bits (FIN..CWR).
    pub flags: u8,
    pub window: u16,
    pub header_len: usize,
}

/// Fixed IPv4 header length (IHL 5).
const IPV4_MIN_HEADER: usize = 20;
/// Fixed IPv6 header length; extension headers follow it.
const IPV6_HEADER: usize = 40;
/// The IPv6 Fragment extension header's next-header value.
const IPV6_NH_FRAGMENT: u8 = 44;
const IPV6_FRAGMENT_HEADER: usize = 8;
const TCP_MIN_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

/// Reads a big-endian `u16` at `at`, or `None` when it is not wholly inside
/// `b`. Every multi-byte read in this module goes through these helpers so
/// no guest-controlled offset can index outside the frame.
fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Parses an Ethernet frame (optionally behind one 802.1Q tag) into
/// [`PacketMeta`].
///
/// Returns `None` only when the frame is shorter than its Ethernet header
/// (14 bytes, or 18 with a tag); anything past that yields as much
/// metadata as the headers honestly describe:
///
/// - IPv4 (version nibble 4, else no IP metadata): the IHL is honoured (below 5 there is no IP metadata, and a
///   header running past the frame yields none either); the payload is
///   clipped to the total length and to the frame, so Ethernet padding is
///   never mistaken for payload; a fragment with a nonzero offset is a
///   `later_fragment` with no L4 header, while a first fragment (MF set,
///   offset 0) still carries the L4 header.
/// - IPv6 (version nibble 6, else no IP metadata): the fixed header and its next header are read directly. The one
///   extension header walked is Fragment (44): a nonzero offset makes a
///   `later_fragment`, offset 0 parses the L4 header inside, and `proto` is
///   the fragment's inner next header. Any other next header is reported
///   as `proto` with no L4 header (the gate treats it by protocol alone).
/// - TCP: a data offset below 5 or past the segment yields no L4 metadata
///   at all; UDP needs its 8-byte header.
///
/// `payload_offset`/`payload_len` describe the L4 payload when an L4
/// header was parsed, otherwise the IP payload, otherwise (non-IP or an
/// unusable IP header) everything after the ethertype.
pub fn parse(frame: &[u8]) -> Option<PacketMeta> {
    let dst_mac = array::<6>(frame, 0)?;
    let src_mac = array::<6>(frame, 6)?;
    let mut ethertype = be16(frame, 12)?;
    let mut l3_offset = 14;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, 16)?;
        l3_offset = 18;
    }
    let mut meta = PacketMeta {
        dst_mac,
        src_mac,
        ethertype,
        l3_offset,
        ip: None,
        l4: None,
        payload_offset: l3_offset,
        payload_len: frame.len() - l3_offset,
    };
    let ip = match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(frame, l3_offset),
        ETHERTYPE_IPV6 => parse_ipv6(frame, l3_offset),
        _ => None,
    };
    let Some(ip) = ip else {
        return Some(meta);
    };
    meta.ip = Some(ip.meta);
    meta.payload_offset = ip.payload_start;
    meta.payload_len = ip.payload_end - ip.payload_start;
    if ip.meta.later_fragment || !ip.l4_follows {
        return Some(meta);
    }
    if let Some(l4) = parse_l4(frame, ip.meta.proto, ip.payload_start, ip.payload_end) {
        let header_len = l4.tcp.map_or(UDP_HEADER, |t| t.header_len);
        meta.payload_offset = l4.offset + header_len;
        meta.payload_len = ip.payload_end - meta.payload_offset;
        meta.l4 = Some(l4);
    }
    Some(meta)
}

/// The IP layer's result: its metadata, where its payload lies in the
/// frame (`payload_start <= payload_end <= frame.len()`), and whether that
/// payload starts with the `proto` header (false when an IPv6 extension
/// header other than Fragment sits there).
struct IpParsed {
    meta: IpMeta,
    payload_start: usize,
    payload_end: usize,
    l4_follows: bool,
}

fn parse_ipv4(frame: &[u8], l3: usize) -> Option<IpParsed> {
    let ver_ihl = *frame.get(l3)?;
    if ver_ihl >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(ver_ihl & 0x0f) * 4;
    if header_len < IPV4_MIN_HEADER || frame.len() - l3 < header_len {
        return None;
    }
    let total_len = usize::from(be16(frame, l3 + 2)?);
    let frag = be16(frame, l3 + 6)?;
    let proto = *frame.get(l3 + 9)?;
    let src = array::<4>(frame, l3 + 12)?;
    let dst = array::<4>(frame, l3 + 16)?;
    let payload_start = l3 + header_len;
    // A total length shorter than the header leaves an empty payload
    // rather than dropping the (readable) addresses.
    let payload_end = (l3 + total_len).min(frame.len()).max(payload_start);
    Some(IpParsed {
        meta: IpMeta {
            proto,
            addrs: IpAddrs::V4 { src, dst },
            later_fragment: frag & 0x1fff != 0,
        },
        payload_start,
        payload_end,
        l4_follows: true,
    })
}

fn parse_ipv6(frame: &[u8], l3: usize) -> Option<IpParsed> {
    if frame.get(l3)? >> 4 != 6 || frame.len() - l3 < IPV6_HEADER {
        return None;
    }
    let payload_len = usize::from(be16(frame, l3 + 4)?);
    let next_header = *frame.get(l3 + 6)?;
    let src = array::<16>(frame, l3 + 8)?;
    let dst = array::<16>(frame, l3 + 24)?;
    let addrs = IpAddrs::V6 { src, dst };
    let start = l3 + IPV6_HEADER;
    // A zero payload length (jumbogram) or a lying one is clipped, as for
    // IPv4: the frame's end is the hard limit.
    let payload_end = (start + payload_len).min(frame.len());
    let mut parsed = IpParsed {
        meta: IpMeta {
            proto: next_header,
            addrs,
            later_fragment: false,
        },
        payload_start: start,
        payload_end,
        l4_follows: matches!(next_header, IPPROTO_TCP | IPPROTO_UDP),
    };
    if next_header == IPV6_NH_FRAGMENT && payload_end - start >= IPV6_FRAGMENT_HEADER {
        let inner = *frame.get(start)?;
        let offset = be16(frame, start + 2)? >> 3;
        parsed.meta.proto = inner;
        parsed.meta.later_fragment = offset != 0;
        parsed.payload_start = start + IPV6_FRAGMENT_HEADER;
        parsed.l4_follows = matches!(inner, IPPROTO_TCP | IPPROTO_UDP);
    }
    Some(parsed)
}

/// Parses a TCP or UDP header at `start`, which must fit before `end` (the
/// IP payload's end, itself within the frame).
fn parse_l4(frame: &[u8], proto: u8, start: usize, end: usize) -> Option<L4Meta> {
    let segment = frame.get(start..end)?;
    let src_port = be16(segment, 0)?;
    let dst_port = be16(segment, 2)?;
    let tcp = match proto {
        IPPROTO_TCP => {
            if segment.len() < TCP_MIN_HEADER {
                return None;
            }
            let header_len = usize::from(segment[12] >> 4) * 4;
            if header_len < TCP_MIN_HEADER || header_len > segment.len() {
                return None;
            }
            Some(TcpMeta {
                seq: be32(segment, 4)?,
                ack: be32(segment, 8)?,
                flags: segment[13],
                window: be16(segment, 14)?,
                header_len,
            })
        }
        IPPROTO_UDP if segment.len() >= UDP_HEADER => None,
        _ => return None,
    };
    Some(L4Meta {
        src_port,
        dst_port,
        offset: start,
        tcp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::{build_tcp_frame, build_udp_frame, insert_vlan_tag};
    use proptest::prelude::*;

    const ICMP: u8 = 1;

    fn arp_frame() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&[0; 20]);
        f
    }

    /// Inserts an 8-byte IPv6 Fragment header (offset in 8-byte units)
    /// after the fixed header of a built IPv6 frame.
    fn with_v6_fragment_header(frame: &[u8], offset: u16, more: bool) -> Vec<u8> {
        let mut f = frame[..54].to_vec();
        let inner = f[20];
        f[20] = 44;
        let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
        f[18..20].copy_from_slice(&plen.to_be_bytes());
        f.extend_from_slice(&[inner, 0]);
        f.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1]);
        f.extend_from_slice(&frame[54..]);
        f
    }

    #[test]
    fn too_short_for_ethernet() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0; 13]), None);
        let m = parse(&[0; 14]).unwrap();
        assert_eq!(
            (m.ethertype, m.l3_offset, m.payload_offset, m.payload_len),
            (0, 14, 14, 0)
        );
        let mut tagged = vec![0; 12];
        tagged.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        tagged.extend_from_slice(&[0, 5, 0x08]);
        assert_eq!(parse(&tagged), None, "17 bytes with a tag");
        tagged.push(0x06);
        let m = parse(&tagged).unwrap();
        assert_eq!(
            (m.ethertype, m.l3_offset, m.payload_len),
            (ETHERTYPE_ARP, 18, 0)
        );
    }

    #[test]
    fn arp_is_non_ip() {
        let f = arp_frame();
        let m = parse(&f).unwrap();
        assert_eq!(m.dst_mac, [0xff; 6]);
        assert_eq!(m.src_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(m.ethertype, ETHERTYPE_ARP);
        assert_eq!(m.ip, None);
        assert_eq!(m.l4, None);
        assert_eq!((m.payload_offset, m.payload_len), (14, 28));
    }

    #[test]
    fn ipv4_tcp() {
        let f = build_tcp_frame(false, 40000, 443, 11, 22, TCP_SYN | TCP_ACK, 1000, b"abc");
        let m = parse(&f).unwrap();
        assert_eq!(m.ethertype, ETHERTYPE_IPV4);
        assert_eq!(
            m.ip,
            Some(IpMeta {
                proto: IPPROTO_TCP,
                addrs: IpAddrs::V4 {
                    src: [10, 0, 0, 1],
                    dst: [10, 0, 0, 2]
                },
                later_fragment: false,
            })
        );
        let l4 = m.l4.unwrap();
        assert_eq!((l4.src_port, l4.dst_port, l4.offset), (40000, 443, 34));
        assert_eq!(
            l4.tcp,
            Some(TcpMeta {
                seq: 11,
                ack: 22,
                flags: TCP_SYN | TCP_ACK,
                window: 1000,
                header_len: 20
            })
        );
        assert_eq!((m.payload_offset, m.payload_len), (54, 3));
        assert_eq!(&f[m.payload_offset..][..m.payload_len], b"abc");
    }

    #[test]
    fn ipv4_tcp_options_and_padding() {
        // Data offset 6 (4 bytes of options); Ethernet padding after the
        // IP packet is not payload.
        let mut f = build_tcp_frame(false, 1, 2, 3, 4, TCP_ACK, 5, &[1, 1, 1, 1]);
        f[46] = 0x60;
        f.resize(80, 0);
        let m = parse(&f).unwrap();
        assert_eq!(m.l4.unwrap().tcp.unwrap().header_len, 24);
        assert_eq!((m.payload_offset, m.payload_len), (58, 0));
    }

    #[test]
    fn ipv4_udp_with_padding() {
        let mut f = build_udp_frame(5353, 53, b"xy");
        f.resize(60, 0);
        let m = parse(&f).unwrap();
        assert_eq!(m.ip.unwrap().proto, IPPROTO_UDP);
        let l4 = m.l4.unwrap();
        assert_eq!(
            (l4.src_port, l4.dst_port, l4.offset, l4.tcp),
            (5353, 53, 34, None)
        );
        assert_eq!((m.payload_offset, m.payload_len), (42, 2));
    }

    #[test]
    fn ipv6_tcp() {
        let f = build_tcp_frame(true, 5000, 22, 1, 2, TCP_PSH | TCP_ACK, 300, b"ssh");
        let m = parse(&f).unwrap();
        assert_eq!(m.ethertype, ETHERTYPE_IPV6);
        let ip = m.ip.unwrap();
        assert_eq!(ip.proto, IPPROTO_TCP);
        assert!(!ip.later_fragment);
        let IpAddrs::V6 { src, dst } = ip.addrs else {
            panic!("v6 addresses")
        };
        assert_eq!((src[0], src[15], dst[15]), (0xfd, 1, 2));
        let l4 = m.l4.unwrap();
        assert_eq!((l4.src_port, l4.dst_port, l4.offset), (5000, 22, 54));
        assert_eq!(l4.tcp.unwrap().flags, TCP_PSH | TCP_ACK);
        assert_eq!((m.payload_offset, m.payload_len), (74, 3));
    }

    #[test]
    fn vlan_tagged() {
        let f = insert_vlan_tag(&build_tcp_frame(false, 1, 80, 0, 0, TCP_SYN, 0, &[]), 100);
        let m = parse(&f).unwrap();
        assert_eq!((m.ethertype, m.l3_offset), (ETHERTYPE_IPV4, 18));
        assert_eq!(m.l4.unwrap().offset, 38);
        assert_eq!((m.payload_offset, m.payload_len), (58, 0));

        let f = insert_vlan_tag(&arp_frame(), 7);
        let m = parse(&f).unwrap();
        assert_eq!(
            (m.ethertype, m.l3_offset, m.payload_offset, m.payload_len),
            (ETHERTYPE_ARP, 18, 18, 28)
        );
    }

    #[test]
    fn ipv4_fragments() {
        let base = build_tcp_frame(false, 1, 2, 3, 4, TCP_ACK, 5, b"0123456789");
        // First fragment (MF, offset 0): the L4 header is there.
        let mut first = base.clone();
        first[20] = 0x20;
        first[21] = 0;
        let m = parse(&first).unwrap();
        assert!(!m.ip.unwrap().later_fragment);
        assert_eq!(m.l4.unwrap().dst_port, 2);
        // A later fragment: its bytes are not a TCP header.
        let mut later = base.clone();
        later[20] = 0x00;
        later[21] = 0x03;
        let m = parse(&later).unwrap();
        assert!(m.ip.unwrap().later_fragment);
        assert_eq!(m.ip.unwrap().proto, IPPROTO_TCP);
        assert_eq!(m.l4, None);
        assert_eq!((m.payload_offset, m.payload_len), (34, 30));
        // DF alone is no fragment.
        let m = parse(&base).unwrap();
        assert!(!m.ip.unwrap().later_fragment);
    }

    #[test]
    fn ipv6_fragment_and_extension_headers() {
        let base = build_tcp_frame(true, 1, 2, 3, 4, TCP_ACK, 5, b"abcd");
        let first = with_v6_fragment_header(&base, 0, true);
        let m = parse(&first).unwrap();
        let ip = m.ip.unwrap();
        assert_eq!((ip.proto, ip.later_fragment), (IPPROTO_TCP, false));
        assert_eq!(m.l4.unwrap().offset, 62);
        assert_eq!((m.payload_offset, m.payload_len), (82, 4));

        let later = with_v6_fragment_header(&base, 185, false);
        let m = parse(&later).unwrap();
        let ip = m.ip.unwrap();
        assert_eq!((ip.proto, ip.later_fragment), (IPPROTO_TCP, true));
        assert_eq!(m.l4, None);
        assert_eq!((m.payload_offset, m.payload_len), (62, 24));

        // A Fragment header cut short by the payload length: reported as
        // protocol 44, nothing inside.
        let mut cut = first.clone();
        cut[18..20].copy_from_slice(&4u16.to_be_bytes());
        let m = parse(&cut).unwrap();
        assert_eq!(m.ip.unwrap().proto, 44);
        assert_eq!(m.l4, None);
        assert_eq!((m.payload_offset, m.payload_len), (54, 4));

        // Hop-by-hop options (0) are not walked.
        let mut hbh = base.clone();
        hbh[20] = 0;
        let m = parse(&hbh).unwrap();
        assert_eq!((m.ip.unwrap().proto, m.l4), (0, None));
        assert_eq!((m.payload_offset, m.payload_len), (54, 24));
    }

    #[test]
    fn icmp_has_ip_but_no_l4() {
        let mut f = build_udp_frame(1, 2, b"ping");
        f[23] = ICMP;
        let m = parse(&f).unwrap();
        assert_eq!(m.ip.unwrap().proto, ICMP);
        assert_eq!(m.l4, None);
        assert_eq!((m.payload_offset, m.payload_len), (34, 12));
    }

    #[test]
    fn lying_ipv4_headers() {
        let base = build_tcp_frame(false, 1, 2, 3, 4, TCP_ACK, 5, b"payload");
        // IHL below 5: no IP metadata; payload is everything after the
        // ethertype.
        let mut f = base.clone();
        f[14] = 0x44;
        let m = parse(&f).unwrap();
        assert_eq!((m.ip, m.l4), (None, None));
        assert_eq!((m.payload_offset, m.payload_len), (14, f.len() - 14));
        // IHL past the frame.
        let mut f = base[..40].to_vec();
        f[14] = 0x4f;
        assert_eq!(parse(&f).unwrap().ip, None);
        // Wrong version nibble.
        let mut f = base.clone();
        f[14] = 0x65;
        assert_eq!(parse(&f).unwrap().ip, None);
        // Truncated IPv4 header.
        assert_eq!(parse(&base[..30]).unwrap().ip, None);
        // Total length beyond the frame: clipped to the frame.
        let mut f = base.clone();
        f[16..18].copy_from_slice(&0xffffu16.to_be_bytes());
        let m = parse(&f).unwrap();
        assert_eq!((m.payload_offset, m.payload_len), (54, 7));
        // Total length shorter than the IP header: addresses, no payload.
        let mut f = base.clone();
        f[16..18].copy_from_slice(&8u16.to_be_bytes());
        let m = parse(&f).unwrap();
        assert!(m.ip.is_some());
        assert_eq!(m.l4, None);
        assert_eq!((m.payload_offset, m.payload_len), (34, 0));
        // Total length cutting into the TCP header.
        let mut f = base.clone();
        f[16..18].copy_from_slice(&30u16.to_be_bytes());
        let m = parse(&f).unwrap();
        assert_eq!(m.l4, None);
        assert_eq!((m.payload_offset, m.payload_len), (34, 10));
        // Frame cut inside the TCP header.
        let m = parse(&base[..50]).unwrap();
        assert_eq!(m.l4, None);
        assert_eq!((m.payload_offset, m.payload_len), (34, 16));
    }

    #[test]
    fn lying_tcp_and_udp_headers() {
        let base = build_tcp_frame(false, 1, 2, 3, 4, TCP_ACK, 5, b"payload");
        for (doff, parsed) in [
            (0u8, false),
            (4, false),
            (5, true),
            (6, true),
            (7, false),
            (8, false),
            (15, false),
        ] {
            let mut f = base.clone();
            f[46] = doff << 4;
            let m = parse(&f).unwrap();
            assert_eq!(m.l4.is_some(), parsed, "data offset {doff}");
            if !parsed {
                assert_eq!((m.payload_offset, m.payload_len), (34, 27));
            }
        }
        let mut f = build_udp_frame(1, 2, b"");
        f[16..18].copy_from_slice(&27u16.to_be_bytes());
        let m = parse(&f).unwrap();
        assert_eq!(m.l4, None, "7 bytes of UDP header");
        assert_eq!((m.payload_offset, m.payload_len), (34, 7));
    }

    #[test]
    fn lying_ipv6_headers() {
        let base = build_tcp_frame(true, 1, 2, 3, 4, TCP_ACK, 5, b"xyz");
        assert_eq!(
            parse(&base[..53]).unwrap().ip,
            None,
            "truncated fixed header"
        );
        let mut f = base.clone();
        f[18..20].copy_from_slice(&0xffffu16.to_be_bytes());
        let m = parse(&f).unwrap();
        assert_eq!((m.payload_offset, m.payload_len), (74, 3));
        let mut f = base.clone();
        f[18..20].copy_from_slice(&0u16.to_be_bytes());
        let m = parse(&f).unwrap();
        assert!(m.ip.is_some());
        assert_eq!(m.l4, None);
        assert_eq!((m.payload_offset, m.payload_len), (54, 0));
    }

    /// Every offset `parse` returns lies within the frame and the pieces
    /// nest: L3 ≤ L4 header ≤ payload ≤ end.
    fn check_bounds(frame: &[u8]) -> Result<(), TestCaseError> {
        let Some(m) = parse(frame) else {
            prop_assert!(frame.len() < 18);
            return Ok(());
        };
        prop_assert!(m.l3_offset <= frame.len());
        prop_assert!(m.l3_offset <= m.payload_offset);
        let end = m
            .payload_offset
            .checked_add(m.payload_len)
            .expect("no overflow");
        prop_assert!(end <= frame.len());
        if let Some(l4) = m.l4 {
            prop_assert!(m.ip.is_some());
            prop_assert!(!m.ip.unwrap().later_fragment);
            let header_len = l4.tcp.map_or(8, |t| t.header_len);
            prop_assert!(l4.offset >= m.l3_offset);
            prop_assert_eq!(l4.offset + header_len, m.payload_offset);
            if let Some(t) = l4.tcp {
                prop_assert!(t.header_len >= 20);
            }
        }
        Ok(())
    }

    /// Frames that reach the deep paths: a valid-looking Ethernet header
    /// (sometimes tagged) and an IP version nibble matching the ethertype,
    /// then random bytes with a chance of a plausible protocol.
    fn ip_like_frame() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<bool>(),
            any::<bool>(),
            prop_oneof![
                Just(IPPROTO_TCP),
                Just(IPPROTO_UDP),
                Just(44u8),
                any::<u8>()
            ],
            proptest::collection::vec(any::<u8>(), 0..120),
        )
            .prop_map(|(tagged, v6, proto, rest)| {
                let mut f = vec![0u8; 12];
                if tagged {
                    f.extend_from_slice(&[0x81, 0, 0, 1]);
                }
                let (ethertype, version, proto_at) = if v6 {
                    (ETHERTYPE_IPV6, 0x60, 6)
                } else {
                    (ETHERTYPE_IPV4, 0x40, 9)
                };
                f.extend_from_slice(&ethertype.to_be_bytes());
                let l3 = f.len();
                f.extend_from_slice(&rest);
                if let Some(b) = f.get_mut(l3) {
                    *b = version | (*b & 0x0f);
                }
                if let Some(b) = f.get_mut(l3 + proto_at) {
                    *b = proto;
                }
                f
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// (a) Arbitrary bytes never panic and all offsets are in bounds.
        #[test]
        fn parse_arbitrary_bytes(frame in proptest::collection::vec(any::<u8>(), 0..200)) {
            check_bounds(&frame)?;
        }

        #[test]
        fn parse_ip_like_frames(frame in ip_like_frame()) {
            check_bounds(&frame)?;
        }

        /// Truncating a real segment anywhere never panics either.
        #[test]
        fn parse_truncated_segments(v6 in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..64), cut in any::<prop::sample::Index>()) {
            let f = build_tcp_frame(v6, 1, 2, 3, 4, TCP_ACK, 5, &payload);
            let n = cut.index(f.len() + 1);
            check_bounds(&f[..n])?;
        }
    }
}
