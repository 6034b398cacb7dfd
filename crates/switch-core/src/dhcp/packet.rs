//! Finding DHCP, and the IPv4 source address a sender claims, in untagged
//! Ethernet frames (the switch pops a VLAN tag before asking).

use std::net::Ipv4Addr;

use super::wire::{parse_bootp, DhcpMessage, CLIENT_PORT, SERVER_PORT};
use crate::frame::{Mac, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETH_HDR};

const IPV4_MIN_HDR: usize = 20;
const UDP_HDR: usize = 8;
const IPPROTO_UDP: u8 = 17;
/// The IPv4 header's flags-and-offset field without DF: more-fragments and
/// the fragment offset.
const MF_OR_OFFSET: u16 = 0x3fff;
const ARP_IPV4_OVER_ETHERNET_LEN: usize = 28;

/// A DHCP message with the addresses it travelled between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpFrame {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub msg: DhcpMessage,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let pair = b.get(at..at + 2)?;
    Some(u16::from_be_bytes([pair[0], pair[1]]))
}

fn addr(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let quad: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(quad))
}

fn mac(b: &[u8], at: usize) -> Option<Mac> {
    Some(Mac(b.get(at..at + 6)?.try_into().ok()?))
}

fn is_dhcp_port(port: u16) -> bool {
    port == SERVER_PORT || port == CLIENT_PORT
}

/// Cheap pre-check for every frame: IPv4, UDP, port 67 or 68 on either
/// side. True does not mean well-formed: a frame that passes here but not
/// [`parse_frame`] is malformed or fragmented DHCP, which snooping should
/// treat as suspect rather than as ordinary traffic. Non-first fragments
/// are false (they carry no ports; their first fragment is what matters).
pub fn is_dhcp(frame: &[u8]) -> bool {
    if frame.len() < ETH_HDR + IPV4_MIN_HDR + 4
        || frame[12] != 0x08
        || frame[13] != 0x00
        || frame[14] >> 4 != 4
        || frame[14] & 0x0f < 5
        || frame[ETH_HDR + 9] != IPPROTO_UDP
        || frame[ETH_HDR + 6] & 0x1f != 0
        || frame[ETH_HDR + 7] != 0
    {
        return false;
    }
    let udp = ETH_HDR + usize::from(frame[14] & 0x0f) * 4;
    be16(frame, udp).is_some_and(is_dhcp_port) || be16(frame, udp + 2).is_some_and(is_dhcp_port)
}

/// Reads a DHCP message out of an untagged Ethernet frame. `None` for
/// anything else, anything malformed, and any IPv4 fragment: DHCP messages
/// fit in one datagram, and a fragmented one could hide its options from
/// snooping. Checksums are not verified: offloaded frames from a guest
/// carry partial ones, and the receiver checks them anyway.
pub fn parse_frame(frame: &[u8]) -> Option<DhcpFrame> {
    if be16(frame, 12)? != ETHERTYPE_IPV4 {
        return None;
    }
    let packet = frame.get(ETH_HDR..)?;
    let ver_ihl = *packet.first()?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_MIN_HDR {
        return None;
    }
    let total = usize::from(be16(packet, 2)?);
    if total < ihl + UDP_HDR {
        return None;
    }
    // Ethernet pads short frames; only `total` bytes are the packet.
    let packet = packet.get(..total)?;
    if be16(packet, 6)? & MF_OR_OFFSET != 0 || packet[9] != IPPROTO_UDP {
        return None;
    }
    let udp = &packet[ihl..];
    let src_port = be16(udp, 0)?;
    let dst_port = be16(udp, 2)?;
    let udp_len = usize::from(be16(udp, 4)?);
    if !(is_dhcp_port(src_port) || is_dhcp_port(dst_port)) || udp_len < UDP_HDR {
        return None;
    }
    let payload = udp.get(UDP_HDR..udp_len)?;
    Some(DhcpFrame {
        src_mac: mac(frame, 6)?,
        dst_mac: mac(frame, 0)?,
        src_ip: addr(packet, 12)?,
        dst_ip: addr(packet, 16)?,
        src_port,
        dst_port,
        msg: parse_bootp(payload).ok()?,
    })
}

/// The IPv4 address a frame's sender claims as its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Claim {
    /// The Ethernet source for IPv4; for ARP the sender hardware address,
    /// since that is what neighbours put in their caches.
    pub mac: Mac,
    /// 0.0.0.0 for a DHCP client without an address yet or an RFC 5227
    /// ARP probe: the caller decides whether to let it through.
    pub ip: Ipv4Addr,
    pub arp: bool,
}

/// For IP source guard: an untagged IPv4 packet's source address, or an
/// ARP (Ethernet/IPv4) packet's sender protocol address. `None` for any
/// other frame, including tagged ones.
pub fn ipv4_claim(frame: &[u8]) -> Option<Ipv4Claim> {
    match be16(frame, 12)? {
        ETHERTYPE_IPV4 => {
            let packet = frame.get(ETH_HDR..ETH_HDR + IPV4_MIN_HDR)?;
            if packet[0] >> 4 != 4 {
                return None;
            }
            Some(Ipv4Claim {
                mac: mac(frame, 6)?,
                ip: addr(packet, 12)?,
                arp: false,
            })
        }
        ETHERTYPE_ARP => {
            let arp = frame.get(ETH_HDR..ETH_HDR + ARP_IPV4_OVER_ETHERNET_LEN)?;
            // Hardware type 1 (Ethernet) or 6 (IEEE 802): Linux accepts
            // both on an Ethernet link, so both are claims.
            let htype = be16(arp, 0)?;
            if !(htype == 1 || htype == 6)
                || be16(arp, 2)? != ETHERTYPE_IPV4
                || arp[4] != 6
                || arp[5] != 4
            {
                return None;
            }
            Some(Ipv4Claim {
                mac: mac(arp, 8)?,
                ip: addr(arp, 14)?,
                arp: true,
            })
        }
        _ => None,
    }
}

fn ipv4_header_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An untagged Ethernet/IPv4/UDP frame around `payload` (TTL 64, no UDP
/// checksum, which IPv4 allows), for tests and for injecting DHCP on a
/// port. A payload too large for one datagram gets wrong length fields.
pub fn udp_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = u16::try_from(UDP_HDR + payload.len()).unwrap_or(u16::MAX);
    let total = udp_len.saturating_add(IPV4_MIN_HDR as u16);
    let mut f = Vec::with_capacity(ETH_HDR + usize::from(total));
    f.extend_from_slice(&dst_mac.0);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let mut ip = [0u8; IPV4_MIN_HDR];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&src_ip.octets());
    ip[16..20].copy_from_slice(&dst_ip.octets());
    let sum = ipv4_header_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::super::wire::{encode_discover, encode_server_reply, MessageType};
    use super::*;
    use proptest::prelude::*;

    const VM: Mac = Mac([0x52, 0x54, 0, 0, 0, 9]);
    const SERVER: Mac = Mac([0x52, 0x54, 0, 0, 0, 1]);

    fn discover_frame() -> Vec<u8> {
        udp_frame(
            VM,
            Mac::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            CLIENT_PORT,
            SERVER_PORT,
            &encode_discover(7, VM, None),
        )
    }

    #[test]
    fn reads_dhcp_from_a_frame() {
        let f = discover_frame();
        assert!(is_dhcp(&f));
        let d = parse_frame(&f).unwrap();
        assert_eq!(d.src_mac, VM);
        assert_eq!(d.dst_mac, Mac::BROADCAST);
        assert_eq!(d.src_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(d.dst_ip, Ipv4Addr::BROADCAST);
        assert_eq!((d.src_port, d.dst_port), (68, 67));
        assert_eq!(d.msg.xid, 7);
        assert_eq!(d.msg.message_type, Some(MessageType::Discover));
    }

    #[test]
    fn ip_options_and_ethernet_padding_are_respected() {
        let f = discover_frame();
        // Two words of IP options (IHL 7), then trailing Ethernet padding.
        let mut g = f[..ETH_HDR].to_vec();
        let mut ip = f[ETH_HDR..ETH_HDR + 20].to_vec();
        ip[0] = 0x47;
        let total = u16::from_be_bytes([ip[2], ip[3]]) + 8;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        g.extend_from_slice(&ip);
        g.extend_from_slice(&[1; 8]);
        g.extend_from_slice(&f[ETH_HDR + 20..]);
        g.extend_from_slice(&[0xee; 30]);
        assert!(is_dhcp(&g));
        assert_eq!(parse_frame(&g).unwrap().msg.xid, 7);
        // A total length shorter than the UDP length claims is malformed.
        let mut short = f.clone();
        short[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&100u16.to_be_bytes());
        assert!(parse_frame(&short).is_none());
        // A total length beyond the frame is malformed.
        let mut long = f.clone();
        long[ETH_HDR + 2..ETH_HDR + 4].copy_from_slice(&2000u16.to_be_bytes());
        assert!(parse_frame(&long).is_none());
        let mut bad_ihl = f;
        bad_ihl[ETH_HDR] = 0x44;
        assert!(parse_frame(&bad_ihl).is_none());
        assert!(!is_dhcp(&bad_ihl));
    }

    #[test]
    fn fragments_are_not_parsed() {
        let mut more = discover_frame();
        more[ETH_HDR + 6] = 0x20;
        assert!(is_dhcp(&more), "a first fragment shows its ports");
        assert!(parse_frame(&more).is_none());
        let mut later = discover_frame();
        later[ETH_HDR + 7] = 0x10;
        assert!(!is_dhcp(&later));
        assert!(parse_frame(&later).is_none());
        let mut df = discover_frame();
        df[ETH_HDR + 6] = 0x40;
        assert!(
            parse_frame(&df).is_some(),
            "don't-fragment is not a fragment"
        );
    }

    #[test]
    fn other_traffic_is_not_dhcp() {
        let dns = udp_frame(
            VM,
            SERVER,
            [10, 0, 0, 9].into(),
            [10, 0, 0, 1].into(),
            5353,
            53,
            &[0; 40],
        );
        assert!(!is_dhcp(&dns));
        assert!(parse_frame(&dns).is_none());
        let mut tcp = discover_frame();
        tcp[ETH_HDR + 9] = 6;
        assert!(!is_dhcp(&tcp));
        assert!(parse_frame(&tcp).is_none());
        let tagged = crate::frame::push_tag(&discover_frame(), 5);
        assert!(!is_dhcp(&tagged));
        assert!(parse_frame(&tagged).is_none());
        // Port 67 on either side is enough; a bad payload is not DHCP.
        let reply = encode_server_reply(
            1,
            VM,
            MessageType::Offer,
            [10, 0, 0, 9].into(),
            Some(9),
            [10, 0, 0, 1].into(),
        );
        let from_server = udp_frame(
            SERVER,
            VM,
            [10, 0, 0, 1].into(),
            [10, 0, 0, 9].into(),
            67,
            40000,
            &reply,
        );
        assert!(is_dhcp(&from_server));
        assert!(parse_frame(&from_server).unwrap().msg.is_server_message());
        let junk = udp_frame(
            SERVER,
            VM,
            [10, 0, 0, 1].into(),
            [10, 0, 0, 9].into(),
            67,
            68,
            &[0; 300],
        );
        assert!(is_dhcp(&junk));
        assert!(parse_frame(&junk).is_none());
    }

    #[test]
    fn claims_from_ipv4_and_arp() {
        let ip = udp_frame(
            VM,
            SERVER,
            [10, 0, 0, 9].into(),
            [10, 0, 0, 1].into(),
            1,
            2,
            &[],
        );
        assert_eq!(
            ipv4_claim(&ip),
            Some(Ipv4Claim {
                mac: VM,
                ip: [10, 0, 0, 9].into(),
                arp: false
            })
        );
        assert_eq!(
            ipv4_claim(&discover_frame()).unwrap().ip,
            Ipv4Addr::UNSPECIFIED
        );
        let spoofed_sender = Mac([2, 0, 0, 0, 0, 0x66]);
        let mut arp = Mac::BROADCAST.0.to_vec();
        arp.extend_from_slice(&VM.0);
        arp.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&spoofed_sender.0);
        arp.extend_from_slice(&[10, 0, 0, 50]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[10, 0, 0, 1]);
        assert_eq!(
            ipv4_claim(&arp),
            Some(Ipv4Claim {
                mac: spoofed_sender,
                ip: [10, 0, 0, 50].into(),
                arp: true
            })
        );
        assert!(ipv4_claim(&arp[..41]).is_none());
        let mut arp_ipv6 = arp.clone();
        arp_ipv6[16..18].copy_from_slice(&[0x86, 0xdd]);
        assert!(ipv4_claim(&arp_ipv6).is_none());
        assert!(ipv4_claim(&crate::frame::rarp_announce(VM)).is_none());
        assert!(ipv4_claim(&crate::frame::push_tag(&ip, 3)).is_none());
        assert!(ipv4_claim(&ip[..33]).is_none());
    }

    #[test]
    fn the_header_checksum_verifies() {
        let f = discover_frame();
        assert_eq!(ipv4_header_checksum(&f[ETH_HDR..ETH_HDR + 20]), 0);
    }

    proptest! {
        #[test]
        fn frame_functions_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = is_dhcp(&bytes);
            let _ = parse_frame(&bytes);
            let _ = ipv4_claim(&bytes);
        }

        #[test]
        fn mutated_dhcp_frames_never_panic(flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..8), cut in 0usize..400) {
            let mut f = discover_frame();
            for (at, v) in flips {
                if let Some(b) = f.get_mut(at) { *b = v; }
            }
            f.truncate(cut.max(1));
            let _ = is_dhcp(&f);
            let _ = parse_frame(&f);
            let _ = ipv4_claim(&f);
        }
    }
}
