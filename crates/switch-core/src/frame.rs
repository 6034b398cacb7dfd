//! Ethernet and 802.1Q: reading addresses and tags, pushing and popping
//! tags. Every function takes untrusted bytes and never panics.

use std::fmt;

pub const ETH_HDR: usize = 14;
pub const TPID_8021Q: u16 = 0x8100;
/// 802.1ad service tag; tandem forwards it as opaque but does not treat it
/// as a VLAN of its own.
pub const TPID_8021AD: u16 = 0x88a8;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_RARP: u16 = 0x8035;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

/// A 48-bit MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// Group (multicast or broadcast) address.
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "`{s}` is not a MAC address (want 52:54:00:12:34:56)"
            ));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!("`{s}` is not a MAC address"));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| format!("`{s}` is not a MAC address"))?;
        }
        Ok(Mac(out))
    }
}

/// Written and read as text (`52:54:00:12:34:56`), like everywhere else a
/// MAC address appears in tandem's documents and API.
impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What the forwarding core needs to know about a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthInfo {
    pub dst: Mac,
    pub src: Mac,
    /// The 802.1Q VLAN ID of the outer tag, if the frame is tagged.
    pub vid: Option<u16>,
    /// The ethertype after the outer 802.1Q tag (if any).
    pub ethertype: u16,
}

/// Reads the Ethernet header (and the outer 802.1Q tag, if present).
/// `None` for frames too short to carry what their header claims.
pub fn parse(frame: &[u8]) -> Option<EthInfo> {
    if frame.len() < ETH_HDR {
        return None;
    }
    let dst = Mac(frame[0..6].try_into().ok()?);
    let src = Mac(frame[6..12].try_into().ok()?);
    let t = u16::from_be_bytes([frame[12], frame[13]]);
    if t == TPID_8021Q {
        if frame.len() < ETH_HDR + 4 {
            return None;
        }
        let tci = u16::from_be_bytes([frame[14], frame[15]]);
        let inner = u16::from_be_bytes([frame[16], frame[17]]);
        Some(EthInfo {
            dst,
            src,
            vid: Some(tci & 0x0fff),
            ethertype: inner,
        })
    } else {
        Some(EthInfo {
            dst,
            src,
            vid: None,
            ethertype: t,
        })
    }
}

/// Inserts an 802.1Q tag (priority 0) after the source MAC.
pub fn push_tag(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    let split = frame.len().min(12);
    out.extend_from_slice(&frame[..split]);
    out.extend_from_slice(&TPID_8021Q.to_be_bytes());
    out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    out.extend_from_slice(&frame[split..]);
    out
}

/// Removes the outer 802.1Q tag; frames without one are returned as they
/// are.
pub fn pop_tag(frame: &[u8]) -> Vec<u8> {
    if frame.len() >= ETH_HDR + 4 && u16::from_be_bytes([frame[12], frame[13]]) == TPID_8021Q {
        let mut out = Vec::with_capacity(frame.len() - 4);
        out.extend_from_slice(&frame[..12]);
        out.extend_from_slice(&frame[16..]);
        out
    } else {
        frame.to_vec()
    }
}

/// A RARP "reverse request" announcing `mac`, as QEMU's announce-self
/// sends: broadcast, so every switch on the path learns where `mac` is.
pub fn rarp_announce(mac: Mac) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&Mac::BROADCAST.0);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f.push(6);
    f.push(4);
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(tagged: Option<u16>) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        if let Some(v) = tagged {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&v.to_be_bytes());
        }
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0xab; 46]);
        f
    }

    #[test]
    fn parses_tagged_and_untagged() {
        let u = parse(&frame(None)).unwrap();
        assert_eq!(u.vid, None);
        assert_eq!(u.ethertype, ETHERTYPE_IPV4);
        assert!(u.dst.is_group());
        let t = parse(&frame(Some(0x2000 | 42))).unwrap();
        assert_eq!(t.vid, Some(42), "priority bits are not part of the VID");
        assert_eq!(t.ethertype, ETHERTYPE_IPV4);
        assert!(parse(&[0; 13]).is_none());
        assert!(parse(&frame(Some(1))[..16]).is_none());
    }

    #[test]
    fn rarp_is_a_broadcast_from_the_mac() {
        let m = Mac([0x52, 0x54, 0, 1, 2, 3]);
        let f = rarp_announce(m);
        let i = parse(&f).unwrap();
        assert_eq!(i.dst, Mac::BROADCAST);
        assert_eq!(i.src, m);
        assert_eq!(i.ethertype, ETHERTYPE_RARP);
        assert_eq!(f.len(), 60);
    }

    proptest! {
        #[test]
        fn push_then_pop_is_identity(body in proptest::collection::vec(any::<u8>(), 14..200), vid in 1u16..4095) {
            let mut body = body;
            // An untagged frame: make sure the ethertype is not 0x8100.
            body[12] = 0x08;
            let tagged = push_tag(&body, vid);
            prop_assert_eq!(parse(&tagged).unwrap().vid, Some(vid));
            prop_assert_eq!(pop_tag(&tagged), body);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&bytes);
            let _ = pop_tag(&bytes);
            let _ = push_tag(&bytes, 7);
        }
    }
}
