//! LLDP (IEEE 802.1AB): what the device at the other end of an uplink says
//! it is.
//!
//! The uplink hands every LLDP frame it receives to a [`NeighbourTable`]
//! instead of the switch: frames to the LLDP groups are for the link, and a
//! bridge must not forward them. This module reads the LLDPDU's chassis id,
//! port id, TTL, port description and system name (everything else is
//! skipped) into an [`LldpNeighbour`], and can write one (tests, and the
//! namespace test's peer). Parsing takes bytes from the wire: it never
//! panics, bounds every text it keeps, and refuses what 802.1AB calls
//! invalid instead of guessing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::frame::{self, Mac, ETH_HDR};

pub const ETHERTYPE_LLDP: u16 = 0x88cc;
/// The group every LLDP agent sends to by default; no bridge forwards it.
pub const NEAREST_BRIDGE: Mac = Mac([0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e]);
/// Not forwarded by any bridge but a two-port MAC relay.
pub const NEAREST_NON_TPMR_BRIDGE: Mac = Mac([0x01, 0x80, 0xc2, 0x00, 0x00, 0x03]);
/// Not forwarded by customer bridges (tandem's switch is one).
pub const NEAREST_CUSTOMER_BRIDGE: Mac = Mac([0x01, 0x80, 0xc2, 0x00, 0x00, 0x00]);

/// Most bytes of an id, a system name or a port description: 802.1AB's
/// limit for each (255), so nothing a neighbour sends can grow a table.
pub const MAX_TEXT: usize = 255;

const TLV_END: u8 = 0;
const TLV_CHASSIS_ID: u8 = 1;
const TLV_PORT_ID: u8 = 2;
const TLV_TTL: u8 = 3;
const TLV_PORT_DESCRIPTION: u8 = 4;
const TLV_SYSTEM_NAME: u8 = 5;
/// The TLV length field is 9 bits.
const MAX_TLV_LEN: usize = 511;
/// IANA address family numbers, as the network-address subtype carries.
const IANA_IPV4: u8 = 1;
const IANA_IPV6: u8 = 2;

/// A chassis id or port id, by its subtype. The chassis and port TLVs
/// number their subtypes differently; this type is the same for both.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LldpId {
    Mac(Mac),
    Network(IpAddr),
    InterfaceName(String),
    InterfaceAlias(String),
    ChassisComponent(String),
    PortComponent(String),
    Local(String),
    /// A subtype not rendered as text (a port's agent circuit id, a
    /// reserved subtype), a MAC address that is not 6 bytes, or an address
    /// family other than IPv4/IPv6: kept as it came, shown in hex.
    Other {
        subtype: u8,
        bytes: Vec<u8>,
    },
}

/// Which TLV an id is in: it decides the subtype numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdTlv {
    Chassis,
    Port,
}

impl IdTlv {
    fn name(self) -> &'static str {
        match self {
            IdTlv::Chassis => "chassis ID",
            IdTlv::Port => "port ID",
        }
    }
}

/// The kinds an id is, by subtype number (802.1AB tables 8-2 and 8-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mac,
    Network,
    InterfaceName,
    InterfaceAlias,
    ChassisComponent,
    PortComponent,
    Local,
}

impl Kind {
    fn of(tlv: IdTlv, subtype: u8) -> Option<Kind> {
        Some(match (tlv, subtype) {
            (IdTlv::Chassis, 1) => Kind::ChassisComponent,
            (IdTlv::Chassis, 2) | (IdTlv::Port, 1) => Kind::InterfaceAlias,
            (IdTlv::Chassis, 3) | (IdTlv::Port, 2) => Kind::PortComponent,
            (IdTlv::Chassis, 4) | (IdTlv::Port, 3) => Kind::Mac,
            (IdTlv::Chassis, 5) | (IdTlv::Port, 4) => Kind::Network,
            (IdTlv::Chassis, 6) | (IdTlv::Port, 5) => Kind::InterfaceName,
            (IdTlv::Chassis, 7) | (IdTlv::Port, 7) => Kind::Local,
            _ => return None,
        })
    }

    fn subtype(self, tlv: IdTlv) -> Option<u8> {
        (0..=u8::MAX).find(|&s| Kind::of(tlv, s) == Some(self))
    }
}

impl LldpId {
    fn kind(&self) -> Option<Kind> {
        Some(match self {
            LldpId::Mac(_) => Kind::Mac,
            LldpId::Network(_) => Kind::Network,
            LldpId::InterfaceName(_) => Kind::InterfaceName,
            LldpId::InterfaceAlias(_) => Kind::InterfaceAlias,
            LldpId::ChassisComponent(_) => Kind::ChassisComponent,
            LldpId::PortComponent(_) => Kind::PortComponent,
            LldpId::Local(_) => Kind::Local,
            LldpId::Other { .. } => return None,
        })
    }

    /// `info` is the TLV's information string: subtype, then the id.
    fn parse(tlv: IdTlv, info: &[u8]) -> Result<LldpId, LldpError> {
        let (&subtype, id) = info.split_first().ok_or(LldpError::BadLength {
            tlv: tlv.name(),
            len: 0,
        })?;
        if id.is_empty() || id.len() > MAX_TEXT {
            return Err(LldpError::BadLength {
                tlv: tlv.name(),
                len: info.len(),
            });
        }
        let other = || LldpId::Other {
            subtype,
            bytes: id.to_vec(),
        };
        Ok(match Kind::of(tlv, subtype) {
            None => other(),
            Some(Kind::Mac) => match <[u8; 6]>::try_from(id) {
                Ok(m) => LldpId::Mac(Mac(m)),
                Err(_) => other(),
            },
            Some(Kind::Network) => match id.split_first() {
                Some((&IANA_IPV4, a)) => match <[u8; 4]>::try_from(a) {
                    Ok(a) => LldpId::Network(IpAddr::V4(Ipv4Addr::from(a))),
                    Err(_) => other(),
                },
                Some((&IANA_IPV6, a)) => match <[u8; 16]>::try_from(a) {
                    Ok(a) => LldpId::Network(IpAddr::V6(Ipv6Addr::from(a))),
                    Err(_) => other(),
                },
                _ => other(),
            },
            Some(Kind::InterfaceName) => LldpId::InterfaceName(text(id)),
            Some(Kind::InterfaceAlias) => LldpId::InterfaceAlias(text(id)),
            Some(Kind::ChassisComponent) => LldpId::ChassisComponent(text(id)),
            Some(Kind::PortComponent) => LldpId::PortComponent(text(id)),
            Some(Kind::Local) => LldpId::Local(text(id)),
        })
    }

    /// The TLV's information string.
    fn encode(&self, tlv: IdTlv) -> Result<Vec<u8>, LldpError> {
        let field = tlv.name();
        let (subtype, id): (u8, Vec<u8>) = match self {
            LldpId::Other { subtype, bytes } => {
                // Written as it is, it would read back as a typed id (or
                // not be an id at all).
                if Kind::of(tlv, *subtype).is_some() {
                    return Err(LldpError::Unencodable {
                        field,
                        why: "an `other` id with a subtype this parser gives a type",
                    });
                }
                (*subtype, bytes.clone())
            }
            typed => {
                let subtype =
                    typed
                        .kind()
                        .and_then(|k| k.subtype(tlv))
                        .ok_or(LldpError::Unencodable {
                            field,
                            why: "a kind of id this TLV has no subtype for",
                        })?;
                let id = match typed {
                    LldpId::Mac(m) => m.0.to_vec(),
                    LldpId::Network(IpAddr::V4(a)) => [&[IANA_IPV4][..], &a.octets()[..]].concat(),
                    LldpId::Network(IpAddr::V6(a)) => [&[IANA_IPV6][..], &a.octets()[..]].concat(),
                    LldpId::InterfaceName(s)
                    | LldpId::InterfaceAlias(s)
                    | LldpId::ChassisComponent(s)
                    | LldpId::PortComponent(s)
                    | LldpId::Local(s) => s.as_bytes().to_vec(),
                    LldpId::Other { .. } => Vec::new(),
                };
                (subtype, id)
            }
        };
        if id.is_empty() || id.len() > MAX_TEXT {
            return Err(LldpError::Unencodable {
                field,
                why: "an id must be 1..=255 bytes",
            });
        }
        let mut info = Vec::with_capacity(1 + id.len());
        info.push(subtype);
        info.extend_from_slice(&id);
        Ok(info)
    }
}

impl fmt::Display for LldpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LldpId::Mac(m) => write!(f, "{m}"),
            LldpId::Network(a) => write!(f, "{a}"),
            LldpId::InterfaceName(s)
            | LldpId::InterfaceAlias(s)
            | LldpId::ChassisComponent(s)
            | LldpId::PortComponent(s)
            | LldpId::Local(s) => f.write_str(s),
            LldpId::Other { subtype, bytes } => {
                write!(f, "subtype-{subtype}:")?;
                bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

/// What one LLDPDU said about its sender.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LldpNeighbour {
    pub chassis_id: LldpId,
    pub port_id: LldpId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_description: Option<String>,
    /// How long the information holds; 0 withdraws it (the neighbour's
    /// LLDP is shutting down).
    pub ttl_s: u16,
}

impl fmt::Display for LldpNeighbour {
    /// `tor-1 Ethernet12 (chassis 00:1c:73:00:00:01)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = &self.system_name {
            write!(f, "{n} ")?;
        }
        write!(f, "{} (chassis {})", self.port_id, self.chassis_id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LldpError {
    #[error("not an LLDP frame (ethertype 0x88cc to an LLDP group address)")]
    NotLldp,
    #[error("the TLV at byte {at} runs past the end of the LLDPDU")]
    Truncated { at: usize },
    #[error(
        "the LLDPDU lacks its {want} TLV (chassis ID, port ID and TTL come first, in that order)"
    )]
    Missing { want: &'static str },
    #[error("{tlv} TLV of {len} bytes")]
    BadLength { tlv: &'static str, len: usize },
    #[error("a second {tlv} TLV")]
    Duplicate { tlv: &'static str },
    #[error("cannot encode the {field}: {why}")]
    Unencodable {
        field: &'static str,
        why: &'static str,
    },
}

/// Whether `dst` is one of the groups LLDP is sent to.
pub fn is_lldp_group(dst: Mac) -> bool {
    dst == NEAREST_BRIDGE || dst == NEAREST_NON_TPMR_BRIDGE || dst == NEAREST_CUSTOMER_BRIDGE
}

/// Whether `frame` is LLDP: ethertype 0x88cc (after an 802.1Q tag, if it
/// has one) sent to an LLDP group. Only the header is looked at: an
/// uplink asks this of every frame it receives.
pub fn is_lldp(frame: &[u8]) -> bool {
    frame::parse(frame).is_some_and(|e| e.ethertype == ETHERTYPE_LLDP && is_lldp_group(e.dst))
}

/// Reads an LLDP frame (see [`is_lldp`]) and its LLDPDU.
pub fn parse_frame(frame: &[u8]) -> Result<LldpNeighbour, LldpError> {
    let eth = frame::parse(frame).ok_or(LldpError::NotLldp)?;
    if eth.ethertype != ETHERTYPE_LLDP || !is_lldp_group(eth.dst) {
        return Err(LldpError::NotLldp);
    }
    let start = ETH_HDR + if eth.vid.is_some() { 4 } else { 0 };
    parse_pdu(frame.get(start..).unwrap_or_default())
}

/// Reads an LLDPDU: chassis ID, port ID and TTL first and in that order,
/// then any TLVs until End (or the end of the bytes: what follows End, or
/// the frame's padding, is not read). Port description and system name
/// are kept, other TLVs skipped.
pub fn parse_pdu(pdu: &[u8]) -> Result<LldpNeighbour, LldpError> {
    let mut chassis_id = None;
    let mut port_id = None;
    let mut ttl_s = None;
    let mut system_name = None;
    let mut port_description = None;
    let mut at = 0;
    let mut index = 0usize;
    while at < pdu.len() {
        let Some(hdr) = pdu.get(at..at + 2) else {
            return Err(LldpError::Truncated { at });
        };
        let hdr = u16::from_be_bytes([hdr[0], hdr[1]]);
        let ty = (hdr >> 9) as u8;
        let len = usize::from(hdr & 0x1ff);
        let Some(info) = pdu.get(at + 2..at + 2 + len) else {
            return Err(LldpError::Truncated { at });
        };
        let want = match index {
            0 => Some((TLV_CHASSIS_ID, "chassis ID")),
            1 => Some((TLV_PORT_ID, "port ID")),
            2 => Some((TLV_TTL, "TTL")),
            _ => None,
        };
        if let Some((t, name)) = want {
            if ty != t {
                return Err(LldpError::Missing { want: name });
            }
        }
        match ty {
            TLV_END => {
                if len != 0 {
                    return Err(LldpError::BadLength { tlv: "End", len });
                }
                break;
            }
            TLV_CHASSIS_ID if chassis_id.is_none() => {
                chassis_id = Some(LldpId::parse(IdTlv::Chassis, info)?)
            }
            TLV_PORT_ID if port_id.is_none() => port_id = Some(LldpId::parse(IdTlv::Port, info)?),
            TLV_TTL if ttl_s.is_none() => match <[u8; 2]>::try_from(info) {
                Ok(b) => ttl_s = Some(u16::from_be_bytes(b)),
                Err(_) => return Err(LldpError::BadLength { tlv: "TTL", len }),
            },
            TLV_CHASSIS_ID | TLV_PORT_ID | TLV_TTL => {
                let tlv = match ty {
                    TLV_CHASSIS_ID => "chassis ID",
                    TLV_PORT_ID => "port ID",
                    _ => "TTL",
                };
                return Err(LldpError::Duplicate { tlv });
            }
            TLV_PORT_DESCRIPTION => optional_text(&mut port_description, "port description", info)?,
            TLV_SYSTEM_NAME => optional_text(&mut system_name, "system name", info)?,
            _ => {}
        }
        index += 1;
        at += 2 + len;
    }
    let missing = |want| LldpError::Missing { want };
    Ok(LldpNeighbour {
        chassis_id: chassis_id.ok_or(missing("chassis ID"))?,
        port_id: port_id.ok_or(missing("port ID"))?,
        ttl_s: ttl_s.ok_or(missing("TTL"))?,
        system_name: system_name.flatten(),
        port_description: port_description.flatten(),
    })
}

/// An optional text TLV: at most one, at most [`MAX_TEXT`] bytes; empty
/// means not given. `slot` is `Some` once the TLV was seen.
fn optional_text(
    slot: &mut Option<Option<String>>,
    tlv: &'static str,
    info: &[u8],
) -> Result<(), LldpError> {
    if slot.is_some() {
        return Err(LldpError::Duplicate { tlv });
    }
    if info.len() > MAX_TEXT {
        return Err(LldpError::BadLength {
            tlv,
            len: info.len(),
        });
    }
    *slot = Some((!info.is_empty()).then(|| text(info)));
    Ok(())
}

/// Bytes from the wire as text for logs and inventories: UTF-8 where it is
/// (invalid sequences replaced), control characters replaced too so that a
/// neighbour cannot write escape sequences into an operator's terminal.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

fn push_tlv(out: &mut Vec<u8>, ty: u8, info: &[u8]) -> Result<(), LldpError> {
    if info.len() > MAX_TLV_LEN {
        return Err(LldpError::Unencodable {
            field: "TLV",
            why: "more than 511 bytes",
        });
    }
    let hdr = (u16::from(ty) << 9) | info.len() as u16;
    out.extend_from_slice(&hdr.to_be_bytes());
    out.extend_from_slice(info);
    Ok(())
}

/// Writes `n` as an LLDPDU (the mandatory TLVs, the optional ones it has,
/// End). Refuses what [`parse_pdu`] would not read back as `n`.
pub fn encode_pdu(n: &LldpNeighbour) -> Result<Vec<u8>, LldpError> {
    let mut out = Vec::with_capacity(64);
    push_tlv(
        &mut out,
        TLV_CHASSIS_ID,
        &n.chassis_id.encode(IdTlv::Chassis)?,
    )?;
    push_tlv(&mut out, TLV_PORT_ID, &n.port_id.encode(IdTlv::Port)?)?;
    push_tlv(&mut out, TLV_TTL, &n.ttl_s.to_be_bytes())?;
    for (ty, field, value) in [
        (
            TLV_PORT_DESCRIPTION,
            "port description",
            &n.port_description,
        ),
        (TLV_SYSTEM_NAME, "system name", &n.system_name),
    ] {
        if let Some(v) = value {
            if v.is_empty() || v.len() > MAX_TEXT {
                return Err(LldpError::Unencodable {
                    field,
                    why: "must be 1..=255 bytes",
                });
            }
            push_tlv(&mut out, ty, v.as_bytes())?;
        }
    }
    push_tlv(&mut out, TLV_END, &[])?;
    Ok(out)
}

/// An untagged LLDP frame from `src` to the nearest-bridge group, padded to
/// the Ethernet minimum.
pub fn encode_frame(src: Mac, n: &LldpNeighbour) -> Result<Vec<u8>, LldpError> {
    let pdu = encode_pdu(n)?;
    let mut f = Vec::with_capacity(ETH_HDR + pdu.len().max(46));
    f.extend_from_slice(&NEAREST_BRIDGE.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ETHERTYPE_LLDP.to_be_bytes());
    f.extend_from_slice(&pdu);
    f.resize(f.len().max(60), 0);
    Ok(f)
}

/// An uplink member's neighbour as `tandem switch stats` and the host's
/// inventory show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkNeighbour {
    pub uplink: String,
    /// The member interface the LLDP frames came in on.
    pub member: String,
    /// The last neighbour heard on it, while its TTL lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbour: Option<LldpNeighbour>,
    /// How long ago `neighbour` was last heard, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    /// LLDP frames received on the member, and those of them that were not
    /// valid LLDPDUs.
    pub lldp_frames: u64,
    pub lldp_errors: u64,
}

/// What [`NeighbourTable::receive`] made of a frame, for the uplink's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A neighbour not heard on this member before (or different now).
    New(LldpNeighbour),
    /// The same neighbour again.
    Refreshed,
    /// TTL 0: the neighbour withdrew what it had said.
    Withdrawn(Option<LldpNeighbour>),
    Invalid(LldpError),
}

#[derive(Debug, Clone)]
struct MemberNeighbour {
    name: String,
    last: Option<(LldpNeighbour, Instant)>,
    frames: u64,
    errors: u64,
}

/// One uplink's neighbours: per member interface, the last neighbour heard
/// and when, until its TTL runs out. Bounded by the member count; one entry
/// per member, however many neighbours talk on a shared segment (the
/// last one wins).
#[derive(Debug, Clone)]
pub struct NeighbourTable {
    members: Vec<MemberNeighbour>,
}

impl NeighbourTable {
    pub fn new(members: &[String]) -> NeighbourTable {
        NeighbourTable {
            members: members
                .iter()
                .map(|name| MemberNeighbour {
                    name: name.clone(),
                    last: None,
                    frames: 0,
                    errors: 0,
                })
                .collect(),
        }
    }

    /// Records an LLDP frame received on member `member` (its index in the
    /// list the table was made with; others are ignored).
    pub fn receive(&mut self, member: usize, frame: &[u8], now: Instant) -> Heard {
        let Some(m) = self.members.get_mut(member) else {
            return Heard::Invalid(LldpError::NotLldp);
        };
        m.frames += 1;
        let n = match parse_frame(frame) {
            Ok(n) => n,
            Err(e) => {
                m.errors += 1;
                return Heard::Invalid(e);
            }
        };
        if n.ttl_s == 0 {
            return Heard::Withdrawn(m.last.take().map(|(n, _)| n));
        }
        let same = m
            .last
            .as_ref()
            .is_some_and(|(old, at)| *old == n && now.saturating_duration_since(*at) < ttl(old));
        m.last = Some((n.clone(), now));
        if same {
            Heard::Refreshed
        } else {
            Heard::New(n)
        }
    }

    /// Forgets neighbours whose TTL has run out at `now`; returns them
    /// with their member.
    pub fn expire(&mut self, now: Instant) -> Vec<(String, LldpNeighbour)> {
        let mut gone = Vec::new();
        for m in &mut self.members {
            let stale = m
                .last
                .as_ref()
                .is_some_and(|(n, at)| now.saturating_duration_since(*at) >= ttl(n));
            if stale {
                if let Some((n, _)) = m.last.take() {
                    gone.push((m.name.clone(), n));
                }
            }
        }
        gone
    }

    /// Every member, with its neighbour if one is current at `now`.
    pub fn snapshot(&self, uplink: &str, now: Instant) -> Vec<UplinkNeighbour> {
        self.members
            .iter()
            .map(|m| {
                let current = m.last.as_ref().and_then(|(n, at)| {
                    let age = now.saturating_duration_since(*at);
                    (age < ttl(n)).then(|| (n.clone(), age))
                });
                UplinkNeighbour {
                    uplink: uplink.to_owned(),
                    member: m.name.clone(),
                    age_ms: current
                        .as_ref()
                        .map(|(_, age)| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
                    neighbour: current.map(|(n, _)| n),
                    lldp_frames: m.frames,
                    lldp_errors: m.errors,
                }
            })
            .collect()
    }
}

fn ttl(n: &LldpNeighbour) -> Duration {
    Duration::from_secs(u64::from(n.ttl_s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC: Mac = Mac([0x02, 0x1c, 0x73, 0, 0, 1]);

    fn tor() -> LldpNeighbour {
        LldpNeighbour {
            chassis_id: LldpId::Mac(Mac([0x00, 0x1c, 0x73, 0xaa, 0xbb, 0xcc])),
            port_id: LldpId::InterfaceName("Ethernet12".into()),
            system_name: Some("tor-1".into()),
            port_description: Some("to host7 eth1".into()),
            ttl_s: 120,
        }
    }

    /// A frame as lldpd on Linux sends it, written out by hand (not by
    /// the encoder under test): chassis MAC, port by interface name,
    /// TTL 120, system name, a capabilities TLV, End, padding.
    const LLDPD: &[u8] = &[
        0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x88, 0xcc,
        // chassis ID: type 1, len 7, subtype 4 (MAC)
        0x02, 0x07, 0x04, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
        // port ID: type 2, len 5, subtype 5 (interface name) "eth0"
        0x04, 0x05, 0x05, b'e', b't', b'h', b'0', // TTL: type 3, len 2, 120
        0x06, 0x02, 0x00, 0x78, // system name: type 5, len 5 "sw-a1"
        0x0a, 0x05, b's', b'w', b'-', b'a', b'1', // capabilities: type 7, len 4
        0x0e, 0x04, 0x00, 0x14, 0x00, 0x14, // End
        0x00, 0x00, // padding
        0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn reads_a_frame_written_by_hand() {
        assert!(is_lldp(LLDPD));
        let n = parse_frame(LLDPD).unwrap();
        assert_eq!(
            n.chassis_id,
            LldpId::Mac(Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
        );
        assert_eq!(n.port_id, LldpId::InterfaceName("eth0".into()));
        assert_eq!(n.ttl_s, 120);
        assert_eq!(n.system_name.as_deref(), Some("sw-a1"));
        assert_eq!(n.port_description, None);
        assert_eq!(n.to_string(), "sw-a1 eth0 (chassis 52:54:00:12:34:56)");
    }

    #[test]
    fn group_addresses_and_tags() {
        let mut f = encode_frame(SRC, &tor()).unwrap();
        for last in [0x0e, 0x03, 0x00] {
            f[5] = last;
            assert!(is_lldp(&f));
            assert_eq!(parse_frame(&f).unwrap(), tor());
        }
        // To another group (or unicast) it is a frame like any other.
        f[5] = 0x01;
        assert!(!is_lldp(&f));
        assert_eq!(parse_frame(&f), Err(LldpError::NotLldp));
        f[5] = 0x0e;
        let tagged = frame::push_tag(&f, 7);
        assert!(is_lldp(&tagged));
        assert_eq!(parse_frame(&tagged).unwrap(), tor());
        let mut ip = f.clone();
        ip[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(!is_lldp(&ip));
    }

    #[test]
    fn subtypes_render_as_text() {
        let id = |tlv, info: &[u8]| LldpId::parse(tlv, info).unwrap().to_string();
        assert_eq!(
            id(IdTlv::Chassis, &[4, 0, 0x1c, 0x73, 1, 2, 0xff]),
            "00:1c:73:01:02:ff"
        );
        assert_eq!(
            id(IdTlv::Port, &[3, 0, 0x1c, 0x73, 1, 2, 0xff]),
            "00:1c:73:01:02:ff"
        );
        assert_eq!(id(IdTlv::Chassis, &[5, 1, 10, 0, 0, 1]), "10.0.0.1");
        let mut v6 = vec![4, 2];
        v6.extend_from_slice(&"fd00::7".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(id(IdTlv::Port, &v6), "fd00::7");
        assert_eq!(id(IdTlv::Port, &[5, b'e', b't', b'1']), "et1");
        assert_eq!(id(IdTlv::Port, &[7, b'1', b'2']), "12");
        assert_eq!(id(IdTlv::Chassis, &[7, b'x']), "x");
        assert_eq!(id(IdTlv::Chassis, &[6, b'b', b'r', 0xff]), "br\u{fffd}");
        // A terminal escape is not passed through.
        assert_eq!(id(IdTlv::Port, &[1, 0x1b, b'[', b'2', b'J']), "\u{fffd}[2J");
        // A MAC subtype of the wrong length, an unknown address family,
        // the agent circuit id and reserved subtypes are kept as bytes.
        assert_eq!(id(IdTlv::Chassis, &[4, 1, 2, 3]), "subtype-4:010203");
        assert_eq!(id(IdTlv::Chassis, &[5, 6, 1, 2]), "subtype-5:060102");
        assert_eq!(id(IdTlv::Chassis, &[5, 1, 10, 0]), "subtype-5:010a00");
        assert_eq!(id(IdTlv::Port, &[6, 0xab]), "subtype-6:ab");
        assert_eq!(id(IdTlv::Chassis, &[0, 0xab]), "subtype-0:ab");
        assert_eq!(id(IdTlv::Chassis, &[200, 0xab]), "subtype-200:ab");
        // An id must hold 1..=255 bytes.
        assert!(LldpId::parse(IdTlv::Chassis, &[4]).is_err());
        assert!(LldpId::parse(IdTlv::Chassis, &[]).is_err());
        assert!(LldpId::parse(IdTlv::Chassis, &[7; 257]).is_err());
        assert!(LldpId::parse(IdTlv::Chassis, &[7; 256]).is_ok());
    }

    #[test]
    fn invalid_lldpdus_are_refused() {
        let pdu = encode_pdu(&tor()).unwrap();
        assert_eq!(parse_pdu(&pdu).unwrap(), tor());
        // Mandatory TLVs out of order, or missing.
        let chassis_len = 2 + usize::from(pdu[1]);
        let port_len = 2 + usize::from(pdu[chassis_len + 1]);
        let mut swapped = pdu[chassis_len..chassis_len + port_len].to_vec();
        swapped.extend_from_slice(&pdu[..chassis_len]);
        swapped.extend_from_slice(&pdu[chassis_len + port_len..]);
        assert_eq!(
            parse_pdu(&swapped),
            Err(LldpError::Missing { want: "chassis ID" })
        );
        assert_eq!(
            parse_pdu(&[0, 0]),
            Err(LldpError::Missing { want: "chassis ID" })
        );
        assert_eq!(
            parse_pdu(&[]),
            Err(LldpError::Missing { want: "chassis ID" })
        );
        assert_eq!(
            parse_pdu(&pdu[..chassis_len + port_len]),
            Err(LldpError::Missing { want: "TTL" })
        );
        // Cut short: an error inside any TLV; at a boundary after the TTL
        // (no End: 802.1AB-2016 lets it go) what came before.
        let ttl_end = chassis_len + port_len + 4;
        for cut in 1..pdu.len() - 2 {
            match parse_pdu(&pdu[..cut]) {
                Ok(n) => {
                    assert!(cut >= ttl_end, "cut at {cut}");
                    assert_eq!((&n.chassis_id, n.ttl_s), (&tor().chassis_id, 120));
                }
                Err(e) => assert!(
                    cut < ttl_end || matches!(e, LldpError::Truncated { .. }),
                    "cut at {cut}: {e}"
                ),
            }
        }
        // A second system name, an End with a length, a 3-byte TTL.
        let mut dup = pdu[..pdu.len() - 2].to_vec();
        push_tlv(&mut dup, TLV_SYSTEM_NAME, b"x").unwrap();
        assert_eq!(
            parse_pdu(&dup),
            Err(LldpError::Duplicate { tlv: "system name" })
        );
        let mut end = pdu[..pdu.len() - 2].to_vec();
        end.extend_from_slice(&[0x00, 0x01, 0x00]);
        assert!(matches!(parse_pdu(&end), Err(LldpError::BadLength { .. })));
        let n = LldpNeighbour {
            system_name: None,
            ..tor()
        };
        let mut p = encode_pdu(&n).unwrap();
        p.truncate(p.len() - 2);
        push_tlv(&mut p, TLV_SYSTEM_NAME, &[b'a'; 256]).unwrap();
        assert!(matches!(parse_pdu(&p), Err(LldpError::BadLength { .. })));
        // Unknown TLVs are skipped; bytes after End are not read.
        let mut extra = pdu[..pdu.len() - 2].to_vec();
        push_tlv(&mut extra, 127, &[0, 0x80, 0xc2, 1, 0, 1]).unwrap();
        push_tlv(&mut extra, TLV_END, &[]).unwrap();
        extra.extend_from_slice(&[0xff; 5]);
        assert_eq!(parse_pdu(&extra).unwrap(), tor());
    }

    #[test]
    fn the_encoder_refuses_what_would_not_read_back() {
        let mut n = tor();
        n.system_name = Some(String::new());
        assert!(encode_pdu(&n).is_err());
        n.system_name = Some("x".repeat(256));
        assert!(encode_pdu(&n).is_err());
        let mut n = tor();
        n.port_id = LldpId::ChassisComponent("c".into());
        assert!(encode_pdu(&n).is_err(), "no such port subtype");
        n.port_id = LldpId::Other {
            subtype: 5,
            bytes: vec![1],
        };
        assert!(encode_pdu(&n).is_err(), "5 is the interface name");
        n.port_id = LldpId::Local(String::new());
        assert!(encode_pdu(&n).is_err());
    }

    #[test]
    fn the_table_keeps_the_last_neighbour_per_member_until_its_ttl() {
        let t0 = Instant::now();
        let mut t = NeighbourTable::new(&["eth1".into(), "eth2".into()]);
        let mut n = tor();
        n.ttl_s = 2;
        let f = encode_frame(SRC, &n).unwrap();
        assert_eq!(t.receive(0, &f, t0), Heard::New(n.clone()));
        assert_eq!(
            t.receive(0, &f, t0 + Duration::from_secs(1)),
            Heard::Refreshed
        );
        let s = t.snapshot("up", t0 + Duration::from_millis(2500));
        assert_eq!(s[0].neighbour.as_ref(), Some(&n));
        assert_eq!(s[0].age_ms, Some(1500));
        assert_eq!(s[0].lldp_frames, 2);
        assert_eq!(s[1].member, "eth2");
        assert_eq!(s[1].neighbour, None);
        // Not heard again: gone after its TTL, in snapshots and for good.
        let late = t0 + Duration::from_secs(3);
        assert_eq!(t.snapshot("up", late)[0].neighbour, None);
        assert_eq!(t.expire(late), vec![("eth1".to_string(), n.clone())]);
        assert!(t.expire(late).is_empty());
        // A different neighbour replaces it; TTL 0 withdraws it; garbage
        // is counted and changes nothing.
        assert_eq!(t.receive(1, &f, late), Heard::New(n.clone()));
        let mut other = n.clone();
        other.system_name = Some("tor-2".into());
        let g = encode_frame(SRC, &other).unwrap();
        assert_eq!(t.receive(1, &g, late), Heard::New(other.clone()));
        assert!(matches!(t.receive(1, &f[..20], late), Heard::Invalid(_)));
        assert_eq!(t.snapshot("up", late)[1].neighbour, Some(other.clone()));
        other.ttl_s = 0;
        let bye = encode_frame(SRC, &other).unwrap();
        assert!(matches!(
            t.receive(1, &bye, late),
            Heard::Withdrawn(Some(_))
        ));
        let s = t.snapshot("up", late);
        assert_eq!(s[1].neighbour, None);
        assert_eq!((s[1].lldp_frames, s[1].lldp_errors), (4, 1));
        assert!(matches!(t.receive(9, &f, late), Heard::Invalid(_)));
    }

    fn text_field() -> impl Strategy<Value = String> {
        // Printable text of 1..=255 bytes: what reads back unchanged.
        "[^\\p{Cc}]{1,80}"
            .prop_filter_map("at most 255 bytes", |s| (s.len() <= MAX_TEXT).then_some(s))
    }

    fn id(tlv: IdTlv) -> impl Strategy<Value = LldpId> {
        let reserved = match tlv {
            IdTlv::Chassis => prop_oneof![Just(0u8), 8u8..=255].boxed(),
            IdTlv::Port => prop_oneof![Just(0u8), Just(6u8), 8u8..=255].boxed(),
        };
        let mut kinds = vec![
            any::<[u8; 6]>().prop_map(|m| LldpId::Mac(Mac(m))).boxed(),
            any::<[u8; 4]>()
                .prop_map(|a| LldpId::Network(IpAddr::V4(a.into())))
                .boxed(),
            any::<[u8; 16]>()
                .prop_map(|a| LldpId::Network(IpAddr::V6(a.into())))
                .boxed(),
            text_field().prop_map(LldpId::InterfaceName).boxed(),
            text_field().prop_map(LldpId::InterfaceAlias).boxed(),
            text_field().prop_map(LldpId::PortComponent).boxed(),
            text_field().prop_map(LldpId::Local).boxed(),
            (reserved, proptest::collection::vec(any::<u8>(), 1..=255))
                .prop_map(|(subtype, bytes)| LldpId::Other { subtype, bytes })
                .boxed(),
        ];
        if tlv == IdTlv::Chassis {
            kinds.push(text_field().prop_map(LldpId::ChassisComponent).boxed());
        }
        proptest::strategy::Union::new(kinds)
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse_pdu(&bytes);
            let mut f = NEAREST_BRIDGE.0.to_vec();
            f.extend_from_slice(&SRC.0);
            f.extend_from_slice(&ETHERTYPE_LLDP.to_be_bytes());
            f.extend_from_slice(&bytes);
            let _ = is_lldp(&f);
            let mut t = NeighbourTable::new(&["m".into()]);
            if let Heard::New(n) = t.receive(0, &f, Instant::now()) {
                // Whatever is kept is bounded.
                for s in [&n.system_name, &n.port_description].into_iter().flatten() {
                    prop_assert!(s.chars().count() <= MAX_TEXT);
                }
                prop_assert!(n.to_string().len() < 4 * 3 * MAX_TEXT);
            }
            let _ = parse_frame(&bytes);
        }

        #[test]
        fn valid_fields_read_back(
            chassis_id in id(IdTlv::Chassis),
            port_id in id(IdTlv::Port),
            system_name in proptest::option::of(text_field()),
            port_description in proptest::option::of(text_field()),
            ttl_s in any::<u16>(),
            tag in proptest::option::of(1u16..4095),
        ) {
            let n = LldpNeighbour { chassis_id, port_id, system_name, port_description, ttl_s };
            let pdu = encode_pdu(&n).unwrap();
            prop_assert_eq!(parse_pdu(&pdu).unwrap(), n.clone());
            let mut f = encode_frame(SRC, &n).unwrap();
            if let Some(v) = tag {
                f = frame::push_tag(&f, v);
            }
            prop_assert!(is_lldp(&f));
            prop_assert_eq!(parse_frame(&f).unwrap(), n.clone());
            // And through JSON, as `switch stats` carries it.
            let json = serde_json::to_string(&n).unwrap();
            prop_assert_eq!(serde_json::from_str::<LldpNeighbour>(&json).unwrap(), n);
        }
    }
}
