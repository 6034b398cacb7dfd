//! BOOTP/DHCP messages as they travel in a UDP datagram: reading the fields
//! and options snooping needs, and writing the messages tandem sends.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::frame::Mac;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
pub const BOOTREQUEST: u8 = 1;
pub const BOOTREPLY: u8 = 2;
/// RFC 2131's "infinite" lease time.
pub const INFINITE_LEASE: u32 = u32::MAX;
/// Asks the server to broadcast its reply: the sender has no address yet,
/// or is not the owner of `chaddr` and could not receive a unicast to it.
pub const BROADCAST_FLAG: u16 = 0x8000;
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];

/// op, htype, hlen, hops, xid, secs, flags, four addresses, chaddr (16),
/// sname (64), file (128).
const FIXED_LEN: usize = 236;
const OPTIONS_START: usize = FIXED_LEN + MAGIC_COOKIE.len();
const SNAME: std::ops::Range<usize> = 44..108;
const FILE: std::ops::Range<usize> = 108..236;
/// RFC 1542's minimum BOOTP message; some relays and old servers drop
/// anything shorter.
const MIN_ENCODED_LEN: usize = 300;
const HTYPE_ETHERNET: u8 = 1;

const OPT_PAD: u8 = 0;
const OPT_END: u8 = 255;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_OVERLOAD: u8 = 52;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PARAMETER_REQUEST: u8 = 55;
const OPT_CLIENT_ID: u8 = 61;

/// Option 53 (and RFC 4388's lease query types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageType {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
    LeaseQuery,
    LeaseUnassigned,
    LeaseUnknown,
    LeaseActive,
    /// Any other value (FORCERENEW, bulk lease query, ...), kept so a
    /// caller can log it.
    Other(u8),
}

impl MessageType {
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            10 => Self::LeaseQuery,
            11 => Self::LeaseUnassigned,
            12 => Self::LeaseUnknown,
            13 => Self::LeaseActive,
            other => Self::Other(other),
        }
    }

    pub fn code(self) -> u8 {
        match self {
            Self::Discover => 1,
            Self::Offer => 2,
            Self::Request => 3,
            Self::Decline => 4,
            Self::Ack => 5,
            Self::Nak => 6,
            Self::Release => 7,
            Self::Inform => 8,
            Self::LeaseQuery => 10,
            Self::LeaseUnassigned => 11,
            Self::LeaseUnknown => 12,
            Self::LeaseActive => 13,
            Self::Other(code) => code,
        }
    }
}

/// The parts of a BOOTP/DHCP message that snooping and lease queries use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpMessage {
    pub op: u8,
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    /// The client's MAC when the message says Ethernet (htype 1, hlen 6);
    /// all zeros otherwise.
    pub chaddr: Mac,
    pub message_type: Option<MessageType>,
    /// Option 51, seconds.
    pub lease_time: Option<u32>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
    /// Option 61, as sent (type byte included).
    pub client_id: Option<Vec<u8>>,
    /// Option 50.
    pub requested_ip: Option<Ipv4Addr>,
}

impl DhcpMessage {
    /// Sent by a server: a BOOTREPLY, or a reply type whatever `op` says
    /// (so a forged reply dressed as a request is still caught).
    pub fn is_server_message(&self) -> bool {
        self.op == BOOTREPLY
            || matches!(
                self.message_type,
                Some(
                    MessageType::Offer
                        | MessageType::Ack
                        | MessageType::Nak
                        | MessageType::LeaseActive
                        | MessageType::LeaseUnassigned
                        | MessageType::LeaseUnknown
                )
            )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DhcpError {
    #[error("{len} bytes is shorter than a BOOTP header and magic cookie ({OPTIONS_START} bytes)")]
    TooShort { len: usize },
    #[error("no DHCP magic cookie after the BOOTP header (plain BOOTP is not DHCP)")]
    NoMagicCookie,
    #[error("option {code} runs past the end of the {area}")]
    OptionOverrun { code: u8, area: &'static str },
    #[error("option {code} is {len} bytes long, which its type does not allow")]
    BadOptionLength { code: u8, len: usize },
    #[error("option overload (52) says {0}; only 1 (file), 2 (sname) or 3 (both) exist")]
    BadOverload(u8),
}

/// The options snooping reads, each the concatenation of all its
/// instances: RFC 3396 lets a sender split a long option, and a split
/// client id must read back whole.
#[derive(Default)]
struct Collected {
    requested_ip: Option<Vec<u8>>,
    lease_time: Option<Vec<u8>>,
    overload: Option<Vec<u8>>,
    message_type: Option<Vec<u8>>,
    server_id: Option<Vec<u8>>,
    client_id: Option<Vec<u8>>,
}

impl Collected {
    fn slot(&mut self, code: u8) -> Option<&mut Option<Vec<u8>>> {
        match code {
            OPT_REQUESTED_IP => Some(&mut self.requested_ip),
            OPT_LEASE_TIME => Some(&mut self.lease_time),
            OPT_OVERLOAD => Some(&mut self.overload),
            OPT_MESSAGE_TYPE => Some(&mut self.message_type),
            OPT_SERVER_ID => Some(&mut self.server_id),
            OPT_CLIENT_ID => Some(&mut self.client_id),
            _ => None,
        }
    }

    /// Reads one area's options up to its END option. An area that ends
    /// without END is accepted: enough stacks omit it that refusing would
    /// blind snooping to real leases.
    fn walk(&mut self, area: &[u8], area_name: &'static str) -> Result<(), DhcpError> {
        let mut at = 0;
        while let Some(&code) = area.get(at) {
            match code {
                OPT_PAD => at += 1,
                OPT_END => return Ok(()),
                _ => {
                    let overrun = || DhcpError::OptionOverrun {
                        code,
                        area: area_name,
                    };
                    let len = usize::from(*area.get(at + 1).ok_or_else(overrun)?);
                    let value = area.get(at + 2..at + 2 + len).ok_or_else(overrun)?;
                    if let Some(slot) = self.slot(code) {
                        slot.get_or_insert_with(Vec::new).extend_from_slice(value);
                    }
                    at += 2 + len;
                }
            }
        }
        Ok(())
    }
}

fn fixed<const N: usize>(code: u8, value: Option<Vec<u8>>) -> Result<Option<[u8; N]>, DhcpError> {
    value
        .map(|v| {
            <[u8; N]>::try_from(v.as_slice())
                .map_err(|_| DhcpError::BadOptionLength { code, len: v.len() })
        })
        .transpose()
}

fn addr_at(payload: &[u8], at: usize) -> Ipv4Addr {
    let mut b = [0u8; 4];
    if let Some(src) = payload.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    Ipv4Addr::from(b)
}

/// Reads a BOOTP/DHCP message from a UDP payload (trailing padding
/// allowed). Options the snooping does not use are skipped; option
/// overload (52) is honoured, so options carried in `file` and `sname`
/// count too.
pub fn parse_bootp(udp_payload: &[u8]) -> Result<DhcpMessage, DhcpError> {
    let p = udp_payload;
    if p.len() < OPTIONS_START {
        return Err(DhcpError::TooShort { len: p.len() });
    }
    if p[FIXED_LEN..OPTIONS_START] != MAGIC_COOKIE {
        return Err(DhcpError::NoMagicCookie);
    }
    let mut opts = Collected::default();
    opts.walk(&p[OPTIONS_START..], "options field")?;
    // RFC 2131 4.1: the options field first, then `file`, then `sname`.
    match fixed::<1>(OPT_OVERLOAD, opts.overload.take())? {
        None => {}
        Some([1]) => opts.walk(&p[FILE], "file field")?,
        Some([2]) => opts.walk(&p[SNAME], "sname field")?,
        Some([3]) => {
            opts.walk(&p[FILE], "file field")?;
            opts.walk(&p[SNAME], "sname field")?;
        }
        Some([other]) => return Err(DhcpError::BadOverload(other)),
    }
    let chaddr = if p[1] == HTYPE_ETHERNET && p[2] == 6 {
        let mut m = [0u8; 6];
        m.copy_from_slice(&p[28..34]);
        Mac(m)
    } else {
        Mac::default()
    };
    Ok(DhcpMessage {
        op: p[0],
        xid: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        flags: u16::from_be_bytes([p[10], p[11]]),
        ciaddr: addr_at(p, 12),
        yiaddr: addr_at(p, 16),
        siaddr: addr_at(p, 20),
        giaddr: addr_at(p, 24),
        chaddr,
        message_type: fixed::<1>(OPT_MESSAGE_TYPE, opts.message_type)?
            .map(|[code]| MessageType::from_code(code)),
        lease_time: fixed::<4>(OPT_LEASE_TIME, opts.lease_time)?.map(u32::from_be_bytes),
        server_id: fixed::<4>(OPT_SERVER_ID, opts.server_id)?.map(Ipv4Addr::from),
        client_id: opts.client_id,
        requested_ip: fixed::<4>(OPT_REQUESTED_IP, opts.requested_ip)?.map(Ipv4Addr::from),
    })
}

fn put_option(out: &mut Vec<u8>, code: u8, value: &[u8]) {
    if value.is_empty() {
        out.extend_from_slice(&[code, 0]);
        return;
    }
    // RFC 3396: a value over 255 bytes goes as consecutive instances.
    for chunk in value.chunks(255) {
        out.push(code);
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
}

fn encode_with(msg: &DhcpMessage, extra: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MIN_ENCODED_LEN);
    out.extend_from_slice(&[msg.op, HTYPE_ETHERNET, 6, 0]);
    out.extend_from_slice(&msg.xid.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes()); // secs
    out.extend_from_slice(&msg.flags.to_be_bytes());
    for a in [msg.ciaddr, msg.yiaddr, msg.siaddr, msg.giaddr] {
        out.extend_from_slice(&a.octets());
    }
    out.extend_from_slice(&msg.chaddr.0);
    out.resize(FIXED_LEN, 0);
    out.extend_from_slice(&MAGIC_COOKIE);
    if let Some(t) = msg.message_type {
        put_option(&mut out, OPT_MESSAGE_TYPE, &[t.code()]);
    }
    if let Some(ip) = msg.requested_ip {
        put_option(&mut out, OPT_REQUESTED_IP, &ip.octets());
    }
    if let Some(secs) = msg.lease_time {
        put_option(&mut out, OPT_LEASE_TIME, &secs.to_be_bytes());
    }
    if let Some(ip) = msg.server_id {
        put_option(&mut out, OPT_SERVER_ID, &ip.octets());
    }
    if let Some(id) = &msg.client_id {
        put_option(&mut out, OPT_CLIENT_ID, id);
    }
    for (code, value) in extra {
        put_option(&mut out, *code, value);
    }
    out.push(OPT_END);
    if out.len() < MIN_ENCODED_LEN {
        out.resize(MIN_ENCODED_LEN, OPT_PAD);
    }
    out
}

/// Writes `msg` as a BOOTP payload (Ethernet hardware type, padded to 300
/// bytes); [`parse_bootp`] reads it back equal.
pub fn encode(msg: &DhcpMessage) -> Vec<u8> {
    encode_with(msg, &[])
}

fn request(xid: u32, mac: Mac, message_type: MessageType) -> DhcpMessage {
    DhcpMessage {
        op: BOOTREQUEST,
        xid,
        flags: 0,
        ciaddr: Ipv4Addr::UNSPECIFIED,
        yiaddr: Ipv4Addr::UNSPECIFIED,
        siaddr: Ipv4Addr::UNSPECIFIED,
        giaddr: Ipv4Addr::UNSPECIFIED,
        chaddr: mac,
        message_type: Some(message_type),
        lease_time: None,
        server_id: None,
        client_id: None,
        requested_ip: None,
    }
}

/// RFC 4388 DHCPLEASEQUERY by MAC address, sent as a relay agent whose
/// address is `giaddr` (servers answer lease queries only to relays).
/// With `client_id`, RFC 4388 servers look the lease up by client id.
pub fn encode_lease_query(
    xid: u32,
    mac: Mac,
    giaddr: Ipv4Addr,
    client_id: Option<&[u8]>,
) -> Vec<u8> {
    let msg = DhcpMessage {
        giaddr,
        client_id: client_id.map(<[u8]>::to_vec),
        ..request(xid, mac, MessageType::LeaseQuery)
    };
    encode_with(
        &msg,
        &[(OPT_PARAMETER_REQUEST, &[OPT_LEASE_TIME, OPT_SERVER_ID])],
    )
}

/// RFC 2131 DHCPREQUEST from a client in RENEWING state: `ciaddr` is the
/// leased address, and there is neither a requested address nor a server
/// id. The server answers to `ip` itself.
pub fn encode_renew_request(xid: u32, mac: Mac, ip: Ipv4Addr, client_id: Option<&[u8]>) -> Vec<u8> {
    let msg = DhcpMessage {
        ciaddr: ip,
        client_id: client_id.map(<[u8]>::to_vec),
        ..request(xid, mac, MessageType::Request)
    };
    encode_with(
        &msg,
        &[(OPT_PARAMETER_REQUEST, &[OPT_LEASE_TIME, OPT_SERVER_ID])],
    )
}

/// DHCPDISCOVER asking for a broadcast reply (see [`BROADCAST_FLAG`]).
pub fn encode_discover(xid: u32, mac: Mac, client_id: Option<&[u8]>) -> Vec<u8> {
    let msg = DhcpMessage {
        flags: BROADCAST_FLAG,
        client_id: client_id.map(<[u8]>::to_vec),
        ..request(xid, mac, MessageType::Discover)
    };
    encode_with(
        &msg,
        &[(OPT_PARAMETER_REQUEST, &[OPT_LEASE_TIME, OPT_SERVER_ID])],
    )
}

/// DHCPREQUEST in SELECTING state (accepting `server`'s offer of `ip`),
/// asking for a broadcast reply.
pub fn encode_select_request(
    xid: u32,
    mac: Mac,
    ip: Ipv4Addr,
    server: Ipv4Addr,
    client_id: Option<&[u8]>,
) -> Vec<u8> {
    let msg = DhcpMessage {
        flags: BROADCAST_FLAG,
        requested_ip: Some(ip),
        server_id: Some(server),
        client_id: client_id.map(<[u8]>::to_vec),
        ..request(xid, mac, MessageType::Request)
    };
    encode_with(
        &msg,
        &[(OPT_PARAMETER_REQUEST, &[OPT_LEASE_TIME, OPT_SERVER_ID])],
    )
}

/// A server's reply to `mac`. `ip` goes where that type carries the
/// client's address: `ciaddr` for lease query answers (RFC 4388), `yiaddr`
/// otherwise.
pub fn server_reply(
    xid: u32,
    mac: Mac,
    message_type: MessageType,
    ip: Ipv4Addr,
    lease_time: Option<u32>,
    server_id: Ipv4Addr,
) -> DhcpMessage {
    let lease_answer = matches!(
        message_type,
        MessageType::LeaseActive | MessageType::LeaseUnassigned | MessageType::LeaseUnknown
    );
    DhcpMessage {
        op: BOOTREPLY,
        ciaddr: if lease_answer {
            ip
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        yiaddr: if lease_answer {
            Ipv4Addr::UNSPECIFIED
        } else {
            ip
        },
        lease_time,
        server_id: Some(server_id),
        ..request(xid, mac, message_type)
    }
}

/// [`server_reply`], encoded.
pub fn encode_server_reply(
    xid: u32,
    mac: Mac,
    message_type: MessageType,
    ip: Ipv4Addr,
    lease_time: Option<u32>,
    server_id: Ipv4Addr,
) -> Vec<u8> {
    encode(&server_reply(
        xid,
        mac,
        message_type,
        ip,
        lease_time,
        server_id,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAC: Mac = Mac([0x52, 0x54, 0, 0, 0, 7]);

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    #[test]
    fn lease_query_is_rfc_4388_by_mac_from_a_relay() {
        let bytes = encode_lease_query(0xdead_beef, MAC, ip(1), None);
        assert!(bytes.len() >= 300);
        assert_eq!(&bytes[..4], &[1, 1, 6, 0]);
        let m = parse_bootp(&bytes).unwrap();
        assert_eq!(m.op, BOOTREQUEST);
        assert_eq!(m.xid, 0xdead_beef);
        assert_eq!(m.giaddr, ip(1));
        assert_eq!(m.ciaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(m.chaddr, MAC);
        assert_eq!(m.message_type, Some(MessageType::LeaseQuery));
        assert_eq!(m.client_id, None);
        // Option 55 asks for the lease time and server id.
        let opts = &bytes[OPTIONS_START..];
        assert!(opts.windows(4).any(|w| w == [55, 2, 51, 54]));
        let with_id = parse_bootp(&encode_lease_query(1, MAC, ip(1), Some(&[1, 2, 3]))).unwrap();
        assert_eq!(with_id.client_id.as_deref(), Some(&[1u8, 2, 3][..]));
    }

    #[test]
    fn renew_request_names_the_lease_in_ciaddr_only() {
        let m = parse_bootp(&encode_renew_request(9, MAC, ip(5), Some(b"\x01abc"))).unwrap();
        assert_eq!(m.message_type, Some(MessageType::Request));
        assert_eq!(m.ciaddr, ip(5));
        assert_eq!(m.requested_ip, None);
        assert_eq!(m.server_id, None);
        assert_eq!(m.flags, 0, "the reply goes unicast to the leased address");
        assert_eq!(m.client_id.as_deref(), Some(&b"\x01abc"[..]));
        assert!(!m.is_server_message());
    }

    #[test]
    fn server_replies_are_recognised_by_op_or_type() {
        let ack = parse_bootp(&encode_server_reply(
            1,
            MAC,
            MessageType::Ack,
            ip(9),
            Some(60),
            ip(1),
        ))
        .unwrap();
        assert!(ack.is_server_message());
        assert_eq!(ack.yiaddr, ip(9));
        assert_eq!(ack.lease_time, Some(60));
        assert_eq!(ack.server_id, Some(ip(1)));
        let active = server_reply(1, MAC, MessageType::LeaseActive, ip(9), None, ip(1));
        assert_eq!(active.ciaddr, ip(9));
        // A reply type dressed as a request still counts as a server's.
        let forged = DhcpMessage {
            op: BOOTREQUEST,
            ..server_reply(1, MAC, MessageType::Offer, ip(9), None, ip(1))
        };
        assert!(forged.is_server_message());
        let discover = parse_bootp(&encode_discover(1, MAC, None)).unwrap();
        assert!(!discover.is_server_message());
        assert_eq!(discover.flags, BROADCAST_FLAG);
    }

    #[test]
    fn malformed_payloads_are_refused_with_a_reason() {
        let good = encode_discover(1, MAC, None);
        assert_eq!(
            parse_bootp(&good[..239]),
            Err(DhcpError::TooShort { len: 239 })
        );
        let mut no_cookie = good.clone();
        no_cookie[236] = 0;
        assert_eq!(parse_bootp(&no_cookie), Err(DhcpError::NoMagicCookie));
        // An option whose length runs off the end.
        let mut overrun = good[..OPTIONS_START].to_vec();
        overrun.extend_from_slice(&[61, 10, 1, 2]);
        assert_eq!(
            parse_bootp(&overrun),
            Err(DhcpError::OptionOverrun {
                code: 61,
                area: "options field"
            })
        );
        // A code with no room for its length byte.
        let mut no_len = good[..OPTIONS_START].to_vec();
        no_len.push(53);
        assert!(matches!(
            parse_bootp(&no_len),
            Err(DhcpError::OptionOverrun { code: 53, .. })
        ));
        let mut bad_len = good[..OPTIONS_START].to_vec();
        bad_len.extend_from_slice(&[51, 3, 0, 0, 1, 255]);
        assert_eq!(
            parse_bootp(&bad_len),
            Err(DhcpError::BadOptionLength { code: 51, len: 3 })
        );
        let mut bad_overload = good[..OPTIONS_START].to_vec();
        bad_overload.extend_from_slice(&[52, 1, 7, 255]);
        assert_eq!(parse_bootp(&bad_overload), Err(DhcpError::BadOverload(7)));
    }

    #[test]
    fn pads_missing_end_and_unknown_options_are_tolerated() {
        let mut p = encode_discover(1, MAC, None)[..OPTIONS_START].to_vec();
        p.extend_from_slice(&[0, 0, 12, 3, b'v', b'm', b'1', 53, 1, 5, 0]);
        let m = parse_bootp(&p).unwrap();
        assert_eq!(m.message_type, Some(MessageType::Ack));
        // Nothing after END is read.
        p.extend_from_slice(&[255, 53, 1, 2]);
        assert_eq!(
            parse_bootp(&p).unwrap().message_type,
            Some(MessageType::Ack)
        );
    }

    #[test]
    fn overloaded_file_and_sname_carry_options() {
        let mut p = encode(&DhcpMessage {
            message_type: None,
            ..server_reply(1, MAC, MessageType::Ack, ip(3), None, ip(1))
        });
        p.truncate(OPTIONS_START);
        p.extend_from_slice(&[52, 1, 3, 53, 1, 5, 255]);
        p[FILE.start..FILE.start + 6].copy_from_slice(&[51, 4, 0, 0, 0, 60]);
        p[FILE.start + 6] = 255;
        p[SNAME.start..SNAME.start + 7].copy_from_slice(&[54, 4, 10, 0, 0, 1, 255]);
        let m = parse_bootp(&p).unwrap();
        assert_eq!(m.message_type, Some(MessageType::Ack));
        assert_eq!(m.lease_time, Some(60));
        assert_eq!(m.server_id, Some(ip(1)));
    }

    #[test]
    fn split_client_ids_are_joined_and_non_ethernet_chaddr_is_zero() {
        let long: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
        let bytes = encode_renew_request(1, MAC, ip(2), Some(&long));
        let m = parse_bootp(&bytes).unwrap();
        assert_eq!(m.client_id.as_deref(), Some(&long[..]));
        let mut token_ring = bytes.clone();
        token_ring[1] = 6;
        assert!(parse_bootp(&token_ring).unwrap().chaddr.is_zero());
        let mut long_hlen = bytes;
        long_hlen[2] = 16;
        assert!(parse_bootp(&long_hlen).unwrap().chaddr.is_zero());
    }

    #[test]
    fn message_type_codes_round_trip() {
        for code in 0..=255u8 {
            assert_eq!(MessageType::from_code(code).code(), code);
        }
        assert_eq!(MessageType::from_code(9), MessageType::Other(9));
        assert_eq!(MessageType::from_code(13), MessageType::LeaseActive);
    }

    fn any_addr() -> impl Strategy<Value = Ipv4Addr> {
        any::<u32>().prop_map(Ipv4Addr::from)
    }

    prop_compose! {
        fn any_message()(
            op in any::<u8>(), xid in any::<u32>(), flags in any::<u16>(),
            addrs in (any_addr(), any_addr(), any_addr(), any_addr()),
            mac in any::<[u8; 6]>(),
            message_type in proptest::option::of(any::<u8>().prop_map(MessageType::from_code)),
            lease_time in proptest::option::of(any::<u32>()),
            server_id in proptest::option::of(any_addr()),
            client_id in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..600)),
            requested_ip in proptest::option::of(any_addr()),
        ) -> DhcpMessage {
            DhcpMessage {
                op, xid, flags, ciaddr: addrs.0, yiaddr: addrs.1, siaddr: addrs.2,
                giaddr: addrs.3, chaddr: Mac(mac), message_type, lease_time, server_id,
                client_id, requested_ip,
            }
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse_bootp(&bytes);
        }

        #[test]
        fn parse_never_panics_past_a_valid_header(
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            overload in any::<u8>(),
        ) {
            let mut p = encode_discover(1, MAC, None)[..OPTIONS_START].to_vec();
            p.extend_from_slice(&[52, 1, overload % 4]);
            p.extend_from_slice(&tail);
            let _ = parse_bootp(&p);
        }

        #[test]
        fn encode_then_parse_round_trips(msg in any_message()) {
            let bytes = encode(&msg);
            prop_assert!(bytes.len() >= MIN_ENCODED_LEN);
            prop_assert_eq!(parse_bootp(&bytes).unwrap(), msg);
        }
    }
}
