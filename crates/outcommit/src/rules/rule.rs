//! One rule of the table: what it constrains, how it matches a frame, and
//! its canonical text.

use std::fmt;

use super::Class;
use crate::packet::{
    L4Meta, Origin, PacketMeta, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPPROTO_TCP,
    IPPROTO_UDP,
};

/// TCP flag names in header bit order, which is also their canonical
/// printing order.
pub(super) const TCP_FLAGS: [(&str, u8); 8] = [
    ("fin", 0x01),
    ("syn", 0x02),
    ("rst", 0x04),
    ("psh", 0x08),
    ("ack", 0x10),
    ("urg", 0x20),
    ("ece", 0x40),
    ("cwr", 0x80),
];

/// An inclusive port range; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PortRange {
    pub(super) lo: u16,
    pub(super) hi: u16,
}

impl PortRange {
    fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// TCP flag constraints: bits in `set` must be set, bits in `clear` must be
/// clear. Never both empty and never overlapping (the parser rejects both),
/// which keeps the printed form unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FlagMatch {
    pub(super) set: u8,
    pub(super) clear: u8,
}

impl fmt::Display for FlagMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, bit) in TCP_FLAGS {
            let sign = if self.set & bit != 0 {
                '+'
            } else if self.clear & bit != 0 {
                '-'
            } else {
                continue;
            };
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{sign}{name}")?;
        }
        Ok(())
    }
}

/// A byte string expected at `offset` into the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PayloadMatch {
    pub(super) offset: usize,
    pub(super) bytes: Vec<u8>,
}

impl fmt::Display for PayloadMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.offset)?;
        // Text is friendlier to read, but only printable ASCII survives a
        // round trip through terminals and JSON unchanged; anything else is
        // printed as hex.
        if self.bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
            f.write_str("\"")?;
            for &b in &self.bytes {
                if b == b'"' || b == b'\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{}", b as char)?;
            }
            f.write_str("\"")
        } else {
            f.write_str("0x")?;
            for b in &self.bytes {
                write!(f, "{b:02x}")?;
            }
            Ok(())
        }
    }
}

/// One line of the rule table. Constructed by parsing its text form, which
/// is where every invariant (valid ranges, no contradictions) is enforced;
/// [`fmt::Display`] prints the canonical text, which parses back to an
/// equal rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub(super) class: Class,
    pub(super) origin: Option<Origin>,
    /// Stored as a number even for `arp`/`ipv4`/`ipv6` so that
    /// `ethertype 0x0800` and `ipv4` are the same rule.
    pub(super) ethertype: Option<u16>,
    /// Likewise `proto 6` is `tcp` and `proto 17` is `udp`.
    pub(super) proto: Option<u8>,
    pub(super) sport: Option<PortRange>,
    pub(super) dport: Option<PortRange>,
    pub(super) flags: Option<FlagMatch>,
    pub(super) payload: Option<PayloadMatch>,
}

impl Rule {
    /// A rule without constraints: it matches every frame.
    pub fn all(class: Class) -> Rule {
        Rule {
            class,
            origin: None,
            ethertype: None,
            proto: None,
            sport: None,
            dport: None,
            flags: None,
            payload: None,
        }
    }

    pub fn class(&self) -> Class {
        self.class
    }

    /// Whether every clause of the rule holds for this frame. `meta` comes
    /// from guest-controlled bytes and may disagree with `frame`, so every
    /// access is checked and a constraint on a layer the frame lacks simply
    /// fails.
    pub fn matches(&self, frame: &[u8], meta: &PacketMeta, origin: Origin) -> bool {
        if self.origin.is_some_and(|o| o != origin) {
            return false;
        }
        if self.ethertype.is_some_and(|e| e != meta.ethertype) {
            return false;
        }
        if let Some(proto) = self.proto {
            let is_ip = meta.ethertype == ETHERTYPE_IPV4 || meta.ethertype == ETHERTYPE_IPV6;
            if !is_ip || meta.ip.map(|ip| ip.proto) != Some(proto) {
                return false;
            }
        }
        let l4 = l4_layer(meta);
        if let Some(range) = self.sport {
            if !l4.is_some_and(|l| range.contains(l.src_port)) {
                return false;
            }
        }
        if let Some(range) = self.dport {
            if !l4.is_some_and(|l| range.contains(l.dst_port)) {
                return false;
            }
        }
        if let Some(flags) = self.flags {
            let Some(tcp) = l4.and_then(|l| l.tcp) else {
                return false;
            };
            if tcp.flags & flags.set != flags.set || tcp.flags & flags.clear != 0 {
                return false;
            }
        }
        if let Some(payload) = &self.payload {
            // For a TCP/UDP rule the payload means the segment's payload; a
            // later fragment carries only the middle of one, and matching
            // there would compare the wrong bytes.
            if self.has_l4_proto() && l4.is_none() {
                return false;
            }
            if !payload_has(frame, meta, payload) {
                return false;
            }
        }
        true
    }

    pub(super) fn has_l4_proto(&self) -> bool {
        matches!(self.proto, Some(IPPROTO_TCP | IPPROTO_UDP))
    }
}

/// The frame's L4 header, if it really has one: a later fragment never
/// does, whatever the metadata claims.
fn l4_layer(meta: &PacketMeta) -> Option<&L4Meta> {
    match meta.ip {
        Some(ip) if !ip.later_fragment => meta.l4.as_ref(),
        _ => None,
    }
}

/// Whether the payload region meta describes holds `m.bytes` at `m.offset`.
/// The region is clipped to the frame: bytes past its end do not exist and
/// cannot match.
fn payload_has(frame: &[u8], meta: &PacketMeta, m: &PayloadMatch) -> bool {
    let Some(rest) = frame.get(meta.payload_offset..) else {
        return false;
    };
    let region = &rest[..meta.payload_len.min(rest.len())];
    let end = m.offset + m.bytes.len(); // both are small by construction
    region.get(m.offset..end) == Some(m.bytes.as_slice())
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.class.as_str())?;
        match self.origin {
            None => {}
            Some(Origin::Vm) => f.write_str(" from vm")?,
            Some(Origin::Forwarded) => f.write_str(" from forwarded")?,
        }
        match self.ethertype {
            None => {}
            Some(e) => write!(f, " {}", EthertypeName(e))?,
        }
        match self.proto {
            None => {}
            Some(p) => write!(f, " {}", ProtoName(p))?,
        }
        if let Some(r) = self.sport {
            write!(f, " sport {r}")?;
        }
        if let Some(r) = self.dport {
            write!(f, " dport {r}")?;
        }
        if let Some(flags) = self.flags {
            write!(f, " flags {flags}")?;
        }
        if let Some(p) = &self.payload {
            write!(f, " payload {p}")?;
        }
        Ok(())
    }
}

/// Prints an ethertype the way a rule would spell it.
pub(super) struct EthertypeName(pub(super) u16);

impl fmt::Display for EthertypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            ETHERTYPE_IPV4 => f.write_str("ipv4"),
            ETHERTYPE_IPV6 => f.write_str("ipv6"),
            ETHERTYPE_ARP => f.write_str("arp"),
            e => write!(f, "ethertype 0x{e:04x}"),
        }
    }
}

/// Prints an IP protocol the way a rule would spell it.
pub(super) struct ProtoName(pub(super) u8);

impl fmt::Display for ProtoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IPPROTO_TCP => f.write_str("tcp"),
            IPPROTO_UDP => f.write_str("udp"),
            p => write!(f, "proto {p}"),
        }
    }
}

impl serde::Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
