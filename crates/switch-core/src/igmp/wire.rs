//! IGMP on the wire: parsing messages and the frames that carry them, and
//! writing the few the switch sends. Every parser takes untrusted bytes and
//! never panics; counts in a message are checked against its length before
//! anything is allocated for them.

use std::net::Ipv4Addr;

use crate::frame::{Mac, ETHERTYPE_IPV4, ETH_HDR};

pub const IPPROTO_IGMP: u8 = 2;
/// Where general queries go.
pub const ALL_SYSTEMS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
/// Where IGMPv2 leaves go.
pub const ALL_ROUTERS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 2);
/// Where IGMPv3 reports go.
pub const IGMPV3_ROUTERS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 22);

const TYPE_QUERY: u8 = 0x11;
const TYPE_V1_REPORT: u8 = 0x12;
const TYPE_V2_REPORT: u8 = 0x16;
const TYPE_V2_LEAVE: u8 = 0x17;
const TYPE_V3_REPORT: u8 = 0x22;

/// RFC 2236 2.2: a v1 query carries 0 in this field and v2 hosts answer it
/// within 10 seconds.
const V1_MAX_RESP_DS: u32 = 100;
/// Robustness variable and query interval the switch advertises: RFC 3376's
/// defaults, so hosts behave as they would under a standard router.
const QRV: u8 = 2;
const QQIC: u8 = 125;
/// Room for an IGMP message in an IPv4 datagram with the Router Alert
/// option (24-byte header); encoders drop what would not fit.
const MAX_PAYLOAD: usize = u16::MAX as usize - 24;
const MIN_FRAME: usize = 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IgmpMessage {
    /// Group 0.0.0.0 = general query. `max_resp_ds` is in tenths of a
    /// second: the v3 code decoded per RFC 3376 4.1.1, and 100 for a v1
    /// query (which carries none).
    Query {
        version: u8,
        group: Ipv4Addr,
        max_resp_ds: u32,
    },
    /// v1 (0x12) / v2 (0x16) membership report.
    Report { version: u8, group: Ipv4Addr },
    /// v2 leave (0x17).
    Leave { group: Ipv4Addr },
    /// v3 report (0x22).
    ReportV3 { records: Vec<GroupRecord> },
}

/// One group record of an IGMPv3 report (RFC 3376 4.2.4). Auxiliary data
/// is skipped when parsing and never written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub record_type: u8,
    pub group: Ipv4Addr,
    pub sources: Vec<Ipv4Addr>,
}

impl GroupRecord {
    pub const MODE_IS_INCLUDE: u8 = 1;
    pub const MODE_IS_EXCLUDE: u8 = 2;
    pub const CHANGE_TO_INCLUDE: u8 = 3;
    pub const CHANGE_TO_EXCLUDE: u8 = 4;
    pub const ALLOW_NEW_SOURCES: u8 = 5;
    pub const BLOCK_OLD_SOURCES: u8 = 6;

    /// Whether the record by itself asks for the group's traffic: EXCLUDE
    /// modes (any source but some), ALLOW with sources, IS_INCLUDE /
    /// TO_INCLUDE with sources. IS_INCLUDE / TO_INCLUDE with no sources
    /// mean "stop". BLOCK never asks for traffic; whether it leaves the
    /// port wanting nothing depends on what the port included before,
    /// which only [`crate::igmp::MembershipTable`] knows. Unknown record
    /// types are ignored (RFC 3376 4.2.12). Source-specific filtering is
    /// not done: membership is per group.
    pub fn wants_traffic(&self) -> bool {
        match self.record_type {
            Self::MODE_IS_EXCLUDE | Self::CHANGE_TO_EXCLUDE => true,
            Self::MODE_IS_INCLUDE | Self::CHANGE_TO_INCLUDE | Self::ALLOW_NEW_SOURCES => {
                !self.sources.is_empty()
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IgmpError {
    #[error("IGMP message of {0} bytes is shorter than its 8-byte header")]
    TooShort(usize),
    #[error("IGMP checksum does not verify")]
    BadChecksum,
    #[error("IGMP type {0:#04x} is not one snooping reads")]
    UnknownType(u8),
    /// RFC 3376 7.1: 8 bytes is a v1/v2 query, 12 or more a v3 one;
    /// anything between is ignored.
    #[error("IGMP query of {0} bytes is neither v1/v2 (8) nor v3 (12 or more)")]
    BadQueryLength(usize),
    #[error("IGMPv3 {what} runs past the end of the {len}-byte message")]
    Truncated { what: &'static str, len: usize },
}

/// An IGMP message and where it came from, read from a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgmpFrame {
    pub src_mac: Mac,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub msg: IgmpMessage,
}

/// Decodes a v3 Max Resp Code or QQIC (RFC 3376 4.1.1, 4.1.7): below 128
/// the value itself, above a 3-bit exponent and 4-bit mantissa.
pub fn decode_max_resp(code: u8) -> u32 {
    if code < 0x80 {
        u32::from(code)
    } else {
        let exp = u32::from((code >> 4) & 0x07);
        let mant = u32::from(code & 0x0f);
        (mant | 0x10) << (exp + 3)
    }
}

/// Encodes a value for a v3 Max Resp Code: exact below 128, rounded down
/// to what the floating-point form holds above (so hosts never wait longer
/// than asked), and the largest code (31744) for anything beyond.
pub fn encode_max_resp(value: u32) -> u8 {
    if value < 0x80 {
        return value as u8;
    }
    for exp in 0..8u32 {
        let mant = value >> (exp + 3);
        if mant <= 0x1f {
            return 0x80 | ((exp as u8) << 4) | ((mant as u8) & 0x0f);
        }
    }
    0xff
}

fn sum16(data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    let mut sum: u32 = 0;
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        // Folding as we go keeps a 64 KiB message from overflowing.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// The Internet checksum (RFC 1071); over data whose checksum field is
/// filled in correctly it is 0.
fn checksum(data: &[u8]) -> u16 {
    let mut sum = sum16(data);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ip_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

/// Parses an IGMP message (the IPv4 payload, exactly as long as the IPv4
/// total length says). The checksum covers the whole payload, so bytes
/// past a v1/v2 message's 8 are allowed (RFC 2236 2.5) but still checked.
pub fn parse_igmp(p: &[u8]) -> Result<IgmpMessage, IgmpError> {
    let len = p.len();
    if len < 8 {
        return Err(IgmpError::TooShort(len));
    }
    if checksum(p) != 0 {
        return Err(IgmpError::BadChecksum);
    }
    let code = p[1];
    let group = ip_at(p, 4).ok_or(IgmpError::TooShort(len))?;
    match p[0] {
        TYPE_QUERY => {
            let (version, max_resp_ds) = match len {
                8 if code == 0 => (1, V1_MAX_RESP_DS),
                8 => (2, u32::from(code)),
                9..=11 => return Err(IgmpError::BadQueryLength(len)),
                _ => {
                    let n = usize::from(be16(p, 10).ok_or(IgmpError::TooShort(len))?);
                    if 12 + 4 * n > len {
                        return Err(IgmpError::Truncated {
                            what: "query's source list",
                            len,
                        });
                    }
                    (3, decode_max_resp(code))
                }
            };
            Ok(IgmpMessage::Query {
                version,
                group,
                max_resp_ds,
            })
        }
        TYPE_V1_REPORT => Ok(IgmpMessage::Report { version: 1, group }),
        TYPE_V2_REPORT => Ok(IgmpMessage::Report { version: 2, group }),
        TYPE_V2_LEAVE => Ok(IgmpMessage::Leave { group }),
        TYPE_V3_REPORT => parse_v3_report(p),
        other => Err(IgmpError::UnknownType(other)),
    }
}

fn parse_v3_report(p: &[u8]) -> Result<IgmpMessage, IgmpError> {
    let len = p.len();
    let count = usize::from(be16(p, 6).ok_or(IgmpError::TooShort(len))?);
    // Each record takes at least 8 bytes, so the capacity is bounded by the
    // message, not by the count it claims.
    let mut records = Vec::with_capacity(count.min((len - 8) / 8));
    let mut at = 8;
    for _ in 0..count {
        let truncated = IgmpError::Truncated {
            what: "group record",
            len,
        };
        let hdr = p.get(at..at + 8).ok_or(truncated)?;
        let aux = usize::from(hdr[1]) * 4;
        let n = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        let group = Ipv4Addr::new(hdr[4], hdr[5], hdr[6], hdr[7]);
        let src_end = at + 8 + 4 * n;
        let end = src_end + aux;
        let srcs = p
            .get(at + 8..src_end)
            .filter(|_| end <= len)
            .ok_or(IgmpError::Truncated {
                what: "group record's sources",
                len,
            })?;
        let sources = srcs
            .chunks_exact(4)
            .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
            .collect();
        records.push(GroupRecord {
            record_type: hdr[0],
            group,
            sources,
        });
        at = end;
    }
    Ok(IgmpMessage::ReportV3 { records })
}

/// Writes an IGMP message (the IPv4 payload). v1 queries carry no max
/// response time; v2 ones cap it at 255; v3 ones encode it per RFC 3376
/// 4.1.1 with S=0, QRV 2, QQIC 125 and no sources. A v3 report keeps only
/// the records (and at most 65535 sources each) that fit in one IPv4
/// datagram.
pub fn encode_igmp(msg: &IgmpMessage) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    match msg {
        IgmpMessage::Query {
            version,
            group,
            max_resp_ds,
        } => {
            let code = match version {
                1 => 0,
                2 => (*max_resp_ds).min(255) as u8,
                _ => encode_max_resp(*max_resp_ds),
            };
            p.extend_from_slice(&[TYPE_QUERY, code, 0, 0]);
            p.extend_from_slice(&group.octets());
            if *version >= 3 {
                p.extend_from_slice(&[QRV & 0x07, QQIC, 0, 0]);
            }
        }
        IgmpMessage::Report { version, group } => {
            let ty = if *version == 1 {
                TYPE_V1_REPORT
            } else {
                TYPE_V2_REPORT
            };
            p.extend_from_slice(&[ty, 0, 0, 0]);
            p.extend_from_slice(&group.octets());
        }
        IgmpMessage::Leave { group } => {
            p.extend_from_slice(&[TYPE_V2_LEAVE, 0, 0, 0]);
            p.extend_from_slice(&group.octets());
        }
        IgmpMessage::ReportV3 { records } => {
            p.extend_from_slice(&[TYPE_V3_REPORT, 0, 0, 0, 0, 0, 0, 0]);
            let mut count: u16 = 0;
            for r in records {
                let n = r.sources.len().min(usize::from(u16::MAX));
                if count == u16::MAX || p.len() + 8 + 4 * n > MAX_PAYLOAD {
                    break;
                }
                p.extend_from_slice(&[r.record_type, 0]);
                p.extend_from_slice(&(n as u16).to_be_bytes());
                p.extend_from_slice(&r.group.octets());
                for s in &r.sources[..n] {
                    p.extend_from_slice(&s.octets());
                }
                count += 1;
            }
            p[6..8].copy_from_slice(&count.to_be_bytes());
        }
    }
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// The Ethernet address IPv4 multicast to `g` is sent to (RFC 1112 6.4):
/// 01:00:5e and the group's low 23 bits.
pub fn group_mac(g: Ipv4Addr) -> Mac {
    let o = g.octets();
    Mac([0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]])
}

/// 224.0.0.0/24: link-local control groups (OSPF, VRRP, mDNS, IGMP
/// itself), which hosts often never report and so are always flooded (RFC
/// 4541 2.1.2).
pub fn is_link_local_group(g: Ipv4Addr) -> bool {
    let o = g.octets();
    o[0] == 224 && o[1] == 0 && o[2] == 0
}

/// An untagged frame's IPv4 header, checked only as far as its lengths.
struct Ipv4<'a> {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    fragment: bool,
    payload: &'a [u8],
}

fn ipv4(frame: &[u8]) -> Option<Ipv4<'_>> {
    if be16(frame, 12)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(ETH_HDR..)?;
    let hdr = ip.get(..20)?;
    if hdr[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    // The frame may be padded past the datagram, never cut short of it.
    if ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    Some(Ipv4 {
        src: Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]),
        dst: Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]),
        proto: hdr[9],
        // More-fragments or a nonzero offset: a piece of a message that
        // cannot be read alone.
        fragment: frag & 0x3fff != 0,
        payload: &ip[ihl..total],
    })
}

/// Reads an IGMP message from an untagged Ethernet frame: IPv4 (options
/// such as Router Alert allowed; the header checksum is not checked, its
/// lengths are), protocol 2, not a fragment, and a well-formed IGMP
/// message. `None` for anything else.
pub fn parse_frame(frame: &[u8]) -> Option<IgmpFrame> {
    let ip = ipv4(frame)?;
    if ip.proto != IPPROTO_IGMP || ip.fragment {
        return None;
    }
    let msg = parse_igmp(ip.payload).ok()?;
    Some(IgmpFrame {
        src_mac: Mac(frame.get(6..12)?.try_into().ok()?),
        src_ip: ip.src,
        dst_ip: ip.dst,
        msg,
    })
}

/// The cheap check for every frame: an untagged IPv4 frame with protocol
/// 2. True for some frames [`parse_frame`] then refuses (malformed,
/// fragments); never false for one it accepts.
pub fn is_igmp(frame: &[u8]) -> bool {
    frame.len() >= ETH_HDR + 20
        && frame[12..14] == ETHERTYPE_IPV4.to_be_bytes()
        && frame[ETH_HDR] >> 4 == 4
        && frame[ETH_HDR + 9] == IPPROTO_IGMP
}

/// The group an untagged IPv4 frame is sent to: its destination in
/// 224.0.0.0/4, when the frame's MAC destination is that group's. A frame
/// to a unicast or broadcast MAC is the MAC table's business whatever its
/// IP destination. Does not tell IGMP from other traffic: check
/// [`is_igmp`] first.
pub fn ipv4_multicast_destination(frame: &[u8]) -> Option<Ipv4Addr> {
    let ip = ipv4(frame)?;
    let dst_mac = frame.get(..6)?;
    (ip.dst.is_multicast() && dst_mac == group_mac(ip.dst).0).then_some(ip.dst)
}

/// An untagged frame carrying `payload` from `src` to `dst_ip`'s group
/// MAC: IPv4 with TOS 0xc0 (internetwork control, as RFC 3376 4 asks),
/// TTL 1 and the Router Alert option (RFC 2113) routers need to look at
/// it, padded to the 60-byte Ethernet minimum.
fn igmp_ip_frame(src_mac: Mac, src_ip: Ipv4Addr, dst_ip: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = (24 + payload.len()).min(usize::from(u16::MAX)) as u16;
    let mut f = Vec::with_capacity((ETH_HDR + usize::from(total)).max(MIN_FRAME));
    f.extend_from_slice(&group_mac(dst_ip).0);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let mut ip = [0u8; 24];
    ip[0] = 0x46;
    ip[1] = 0xc0;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 1;
    ip[9] = IPPROTO_IGMP;
    ip[12..16].copy_from_slice(&src_ip.octets());
    ip[16..20].copy_from_slice(&dst_ip.octets());
    ip[20..24].copy_from_slice(&[0x94, 0x04, 0x00, 0x00]);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&payload[..usize::from(total) - 24]);
    if f.len() < MIN_FRAME {
        f.resize(MIN_FRAME, 0);
    }
    f
}

/// The switch's IGMPv3 general query to 224.0.0.1 (v2 hosts answer it too:
/// RFC 3376 7.1), with `max_resp_ds` tenths of a second encoded per RFC
/// 3376 4.1.1, S=0, QRV 2, QQIC 125.
pub fn general_query_frame(src_mac: Mac, src_ip: Ipv4Addr, max_resp_ds: u32) -> Vec<u8> {
    let msg = IgmpMessage::Query {
        version: 3,
        group: Ipv4Addr::UNSPECIFIED,
        max_resp_ds,
    };
    igmp_ip_frame(src_mac, src_ip, ALL_SYSTEMS, &encode_igmp(&msg))
}

/// A host joining `group`: a v1 or v2 report to the group itself, or (for
/// `version` 3) a v3 report with one TO_EXCLUDE({}) record, the join
/// Linux sends, to 224.0.0.22. Any other version is written as v2.
pub fn report_frame(src_mac: Mac, src_ip: Ipv4Addr, group: Ipv4Addr, version: u8) -> Vec<u8> {
    if version == 3 {
        let rec = GroupRecord {
            record_type: GroupRecord::CHANGE_TO_EXCLUDE,
            group,
            sources: Vec::new(),
        };
        return v3_report_frame(src_mac, src_ip, std::slice::from_ref(&rec));
    }
    let version = if version == 1 { 1 } else { 2 };
    let msg = IgmpMessage::Report { version, group };
    igmp_ip_frame(src_mac, src_ip, group, &encode_igmp(&msg))
}

/// A v3 report with these records, to 224.0.0.22.
pub fn v3_report_frame(src_mac: Mac, src_ip: Ipv4Addr, records: &[GroupRecord]) -> Vec<u8> {
    let msg = IgmpMessage::ReportV3 {
        records: records.to_vec(),
    };
    igmp_ip_frame(src_mac, src_ip, IGMPV3_ROUTERS, &encode_igmp(&msg))
}

/// A v2 leave of `group`, to 224.0.0.2.
pub fn leave_frame(src_mac: Mac, src_ip: Ipv4Addr, group: Ipv4Addr) -> Vec<u8> {
    let msg = IgmpMessage::Leave { group };
    igmp_ip_frame(src_mac, src_ip, ALL_ROUTERS, &encode_igmp(&msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0x0a]);
    const SRC_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const GROUP: Ipv4Addr = Ipv4Addr::new(239, 1, 2, 3);

    #[test]
    fn general_query_golden_bytes() {
        let f = general_query_frame(SRC_MAC, SRC_IP, 100);
        let want: Vec<u8> = [
            // Ethernet: 01:00:5e:00:00:01 from SRC_MAC, IPv4.
            &[0x01, 0x00, 0x5e, 0x00, 0x00, 0x01][..],
            &[0x02, 0, 0, 0, 0, 0x0a],
            &[0x08, 0x00],
            // IPv4: IHL 6, TOS 0xc0, length 36, TTL 1, IGMP.
            &[0x46, 0xc0, 0x00, 0x24, 0, 0, 0, 0, 0x01, 0x02],
            &[0x00, 0x00], // header checksum, checked below
            &[192, 0, 2, 10, 224, 0, 0, 1],
            &[0x94, 0x04, 0x00, 0x00],
            // IGMPv3 query: code 100, checksum, group 0, QRV 2, QQIC 125.
            &[0x11, 100, 0x00, 0x00, 0, 0, 0, 0, 0x02, 125, 0x00, 0x00],
            &[0; 10],
        ]
        .concat();
        assert_eq!(f.len(), 60);
        let mut masked = f.clone();
        masked[24..26].fill(0);
        masked[40..42].fill(0);
        assert_eq!(masked, want);
        assert_eq!(checksum(&f[14..38]), 0, "IPv4 header checksum");
        assert_eq!(checksum(&f[38..50]), 0, "IGMP checksum");
        // Recomputed by hand from the 16-bit words, to not only trust
        // `checksum` against itself.
        let ip_words: u32 = [
            0x46c0u32, 0x0024, 0, 0, 0x0102, 0xc000, 0x020a, 0xe000, 0x0001,
        ]
        .iter()
        .sum::<u32>()
            + 0x9404;
        let folded = (ip_words & 0xffff) + (ip_words >> 16);
        assert_eq!(u16::from_be_bytes([f[24], f[25]]), !(folded as u16));
        let igmp_words: u32 = 0x1164 + 0x027d;
        assert_eq!(u16::from_be_bytes([f[40], f[41]]), !(igmp_words as u16));
    }

    #[test]
    fn general_query_parses_back() {
        let f = general_query_frame(SRC_MAC, SRC_IP, 100);
        assert!(is_igmp(&f));
        let got = parse_frame(&f).unwrap();
        assert_eq!(got.src_mac, SRC_MAC);
        assert_eq!(got.src_ip, SRC_IP);
        assert_eq!(got.dst_ip, ALL_SYSTEMS);
        assert_eq!(
            got.msg,
            IgmpMessage::Query {
                version: 3,
                group: Ipv4Addr::UNSPECIFIED,
                max_resp_ds: 100
            }
        );
    }

    #[test]
    fn max_resp_code_encodes_per_rfc_3376() {
        for v in 0..128 {
            assert_eq!(u32::from(encode_max_resp(v)), v);
        }
        // 0x80 = exp 0, mant 0 = 16 << 3.
        assert_eq!(encode_max_resp(128), 0x80);
        assert_eq!(decode_max_resp(0x80), 128);
        assert_eq!(decode_max_resp(0xff), 31744);
        assert_eq!(encode_max_resp(31744), 0xff);
        assert_eq!(encode_max_resp(u32::MAX), 0xff);
        // Not representable: rounded down, never up.
        assert_eq!(decode_max_resp(encode_max_resp(1000)), 992);
        for v in 0..40_000u32 {
            let d = decode_max_resp(encode_max_resp(v));
            assert!(d <= v, "{v} -> {d}");
            assert!(v.min(31744) - d <= v.min(31744) / 16, "{v} -> {d}");
        }
        let f = general_query_frame(SRC_MAC, SRC_IP, 1000);
        assert_eq!(
            parse_frame(&f).unwrap().msg,
            IgmpMessage::Query {
                version: 3,
                group: Ipv4Addr::UNSPECIFIED,
                max_resp_ds: 992
            }
        );
    }

    #[test]
    fn reports_and_leaves_round_trip() {
        for version in [1, 2] {
            let f = report_frame(SRC_MAC, SRC_IP, GROUP, version);
            assert_eq!(&f[..6], &group_mac(GROUP).0);
            let got = parse_frame(&f).unwrap();
            assert_eq!(got.dst_ip, GROUP);
            assert_eq!(
                got.msg,
                IgmpMessage::Report {
                    version,
                    group: GROUP
                }
            );
        }
        let got = parse_frame(&report_frame(SRC_MAC, SRC_IP, GROUP, 3)).unwrap();
        assert_eq!(got.dst_ip, IGMPV3_ROUTERS);
        assert_eq!(
            got.msg,
            IgmpMessage::ReportV3 {
                records: vec![GroupRecord {
                    record_type: GroupRecord::CHANGE_TO_EXCLUDE,
                    group: GROUP,
                    sources: vec![]
                }]
            }
        );
        let got = parse_frame(&leave_frame(SRC_MAC, SRC_IP, GROUP)).unwrap();
        assert_eq!(got.dst_ip, ALL_ROUTERS);
        assert_eq!(got.msg, IgmpMessage::Leave { group: GROUP });
        let records = vec![
            GroupRecord {
                record_type: GroupRecord::ALLOW_NEW_SOURCES,
                group: GROUP,
                sources: vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
            },
            GroupRecord {
                record_type: GroupRecord::CHANGE_TO_INCLUDE,
                group: Ipv4Addr::new(239, 9, 9, 9),
                sources: vec![],
            },
        ];
        let got = parse_frame(&v3_report_frame(SRC_MAC, SRC_IP, &records)).unwrap();
        assert_eq!(got.msg, IgmpMessage::ReportV3 { records });
        for (version, max_resp_ds) in [(1, 100), (2, 55), (3, 31744)] {
            let q = IgmpMessage::Query {
                version,
                group: GROUP,
                max_resp_ds,
            };
            assert_eq!(parse_igmp(&encode_igmp(&q)), Ok(q));
        }
    }

    #[test]
    fn rejects_bad_checksums_lengths_and_types() {
        let mut p = encode_igmp(&IgmpMessage::Leave { group: GROUP });
        assert_eq!(parse_igmp(&p[..7]), Err(IgmpError::TooShort(7)));
        p[7] ^= 1;
        assert_eq!(parse_igmp(&p), Err(IgmpError::BadChecksum));
        assert_eq!(parse_igmp(&[0; 8]), Err(IgmpError::BadChecksum));
        let mut q = vec![0x11, 10, 0, 0, 0, 0, 0, 0, 0, 0];
        let c = checksum(&q);
        q[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse_igmp(&q), Err(IgmpError::BadQueryLength(10)));
        let mut d = vec![0x13, 0, 0, 0, 0, 0, 0, 0];
        let c = checksum(&d);
        d[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse_igmp(&d), Err(IgmpError::UnknownType(0x13)));
    }

    fn with_checksum(mut p: Vec<u8>) -> Vec<u8> {
        p[2..4].fill(0);
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn counts_are_bounded_by_the_message() {
        // A v3 report claiming 65535 records in 8 bytes.
        let r = with_checksum(vec![0x22, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert!(matches!(parse_igmp(&r), Err(IgmpError::Truncated { .. })));
        // One record claiming 65535 sources, and one whose aux data runs
        // past the end.
        let r = with_checksum(vec![
            0x22, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0xff, 0xff, 239, 0, 0, 1,
        ]);
        assert!(matches!(parse_igmp(&r), Err(IgmpError::Truncated { .. })));
        let r = with_checksum(vec![0x22, 0, 0, 0, 0, 0, 0, 1, 2, 1, 0, 0, 239, 0, 0, 1]);
        assert!(matches!(parse_igmp(&r), Err(IgmpError::Truncated { .. })));
        // Aux data is skipped.
        let r = with_checksum(vec![
            0x22, 0, 0, 0, 0, 0, 0, 1, 2, 1, 0, 0, 239, 0, 0, 1, 9, 9, 9, 9,
        ]);
        assert_eq!(
            parse_igmp(&r),
            Ok(IgmpMessage::ReportV3 {
                records: vec![GroupRecord {
                    record_type: 2,
                    group: Ipv4Addr::new(239, 0, 0, 1),
                    sources: vec![]
                }]
            })
        );
        // A v3 query's source count.
        let q = with_checksum(vec![0x11, 0, 0, 0, 0, 0, 0, 0, 2, 125, 0, 2, 1, 2, 3, 4]);
        assert!(matches!(parse_igmp(&q), Err(IgmpError::Truncated { .. })));
    }

    #[test]
    fn frames_refused_when_tagged_fragmented_or_short() {
        let f = report_frame(SRC_MAC, SRC_IP, GROUP, 2);
        assert!(parse_frame(&f).is_some());
        // Padding past the datagram is fine; a datagram cut short is not.
        assert!(parse_frame(&f[..14 + 24 + 8]).is_some());
        assert!(parse_frame(&f[..14 + 24 + 7]).is_none());
        let mut frag = f.clone();
        frag[14 + 6] = 0x20; // more fragments
        assert!(parse_frame(&frag).is_none());
        let mut frag = f.clone();
        frag[14 + 7] = 1; // offset 8
        assert!(parse_frame(&frag).is_none());
        let tagged = crate::frame::push_tag(&f, 5);
        assert!(!is_igmp(&tagged));
        assert!(parse_frame(&tagged).is_none());
        let mut bad_ihl = f.clone();
        bad_ihl[14] = 0x44;
        assert!(parse_frame(&bad_ihl).is_none());
        let mut udp = f.clone();
        udp[14 + 9] = 17;
        assert!(!is_igmp(&udp));
        assert!(parse_frame(&udp).is_none());
        // IHL 5, no Router Alert: still IGMP.
        let mut plain = f[..14].to_vec();
        let mut ip = f[14..34].to_vec();
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&28u16.to_be_bytes());
        plain.extend_from_slice(&ip);
        plain.extend_from_slice(&f[38..46]);
        assert_eq!(
            parse_frame(&plain).unwrap().msg,
            parse_frame(&f).unwrap().msg
        );
    }

    #[test]
    fn multicast_destination_and_group_helpers() {
        assert_eq!(
            group_mac(Ipv4Addr::new(239, 129, 2, 3)).0,
            [1, 0, 0x5e, 1, 2, 3]
        );
        assert_eq!(group_mac(ALL_SYSTEMS).0, [1, 0, 0x5e, 0, 0, 1]);
        assert!(is_link_local_group(Ipv4Addr::new(224, 0, 0, 251)));
        assert!(!is_link_local_group(Ipv4Addr::new(224, 0, 1, 1)));
        assert!(!is_link_local_group(GROUP));
        // A UDP datagram to the group, built from a report's headers.
        let mut f = report_frame(SRC_MAC, SRC_IP, GROUP, 2);
        f[14 + 9] = 17;
        assert_eq!(ipv4_multicast_destination(&f), Some(GROUP));
        let mut unicast_mac = f.clone();
        unicast_mac[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        assert_eq!(ipv4_multicast_destination(&unicast_mac), None);
        let mut unicast_ip = f.clone();
        unicast_ip[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(ipv4_multicast_destination(&unicast_ip), None);
        assert_eq!(ipv4_multicast_destination(&f[..20]), None);
    }

    /// Optional cross-check with an independent decoder.
    #[test]
    fn tcpdump_reads_the_general_query() {
        let Ok(out) = std::process::Command::new("tcpdump")
            .arg("--version")
            .output()
        else {
            eprintln!("tcpdump not installed; skipped");
            return;
        };
        if !out.status.success() {
            return;
        }
        let f = general_query_frame(SRC_MAC, SRC_IP, 100);
        let mut pcap = Vec::new();
        pcap.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        pcap.extend_from_slice(&2u16.to_le_bytes());
        pcap.extend_from_slice(&4u16.to_le_bytes());
        pcap.extend_from_slice(&[0; 8]);
        pcap.extend_from_slice(&65535u32.to_le_bytes());
        pcap.extend_from_slice(&1u32.to_le_bytes()); // Ethernet
        pcap.extend_from_slice(&[0; 8]);
        pcap.extend_from_slice(&(f.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&(f.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&f);
        let path = std::env::temp_dir().join(format!("tandem-igmp-{}.pcap", std::process::id()));
        std::fs::write(&path, &pcap).unwrap();
        let out = std::process::Command::new("tcpdump")
            .args(["-n", "-v", "-r"])
            .arg(&path)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("igmp query v3"), "{text}");
        assert!(text.contains("224.0.0.1"), "{text}");
        assert!(text.contains("ttl 1"), "{text}");
        assert!(text.contains("RA"), "{text}");
        assert!(!text.contains("bad cksum"), "{text}");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_igmp(&bytes);
            let parsed = parse_frame(&bytes);
            if parsed.is_some() {
                prop_assert!(is_igmp(&bytes));
            }
            let _ = ipv4_multicast_destination(&bytes);
            // The same bytes as the payload of a well-formed frame.
            let mut f = report_frame(SRC_MAC, SRC_IP, GROUP, 2)[..38].to_vec();
            let total = (24 + bytes.len()) as u16;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&bytes);
            prop_assert_eq!(parse_frame(&f).map(|g| g.msg), parse_igmp(&bytes).ok());
        }

        /// Checksummed random v3 reports: accepted ones are bounded by
        /// their length and read back the same once written out.
        #[test]
        fn v3_reports_round_trip(mut bytes in proptest::collection::vec(any::<u8>(), 8..300)) {
            bytes[0] = TYPE_V3_REPORT;
            bytes[6] = 0;
            bytes[7] %= 8;
            let p = with_checksum(bytes);
            if let Ok(msg) = parse_igmp(&p) {
                let IgmpMessage::ReportV3 { records } = &msg else {
                    panic!("{msg:?}")
                };
                let sources: usize = records.iter().map(|r| r.sources.len()).sum();
                prop_assert!(8 + 8 * records.len() + 4 * sources <= p.len());
                prop_assert_eq!(parse_igmp(&encode_igmp(&msg)), Ok(msg));
            }
        }
    }
}
