//! VDP as ratified in IEEE 802.1Qbg-2012 clause 41 ("VDP22" in lldpad).
//!
//! A VDP ECPDU payload is a sequence of TLVs, each behind the 16-bit header
//! (7-bit type, 9-bit value length): a VSI Manager ID TLV (type 5, value =
//! 16 bytes), then one or more VSI TLVs whose type is the request mode
//! (1 pre-associate, 2 pre-associate with resource reservation, 3 associate,
//! 4 de-associate), optionally organizationally defined TLVs (type 127), and
//! an End TLV (type 0) or simply the end of the payload.
//!
//! # VSI TLV layout
//!
//! Offsets from the first byte of the TLV (the header); value offsets are
//! these minus 2. Checked against lldpad's `vsi22_2tlv` / `ptlv_2_vsi22`
//! (qbg/vdp22sm.c) and Wireshark's `dissect_vdp_tlv_assoc`
//! (epan/dissectors/packet-ecp.c), which agree with the standard's figure:
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! | 0      | 2    | header: type (mode) << 9 \| value length |
//! | 2      | 1    | status (see below)                      |
//! | 3      | 3    | VSI Type ID, big endian                 |
//! | 6      | 1    | VSI Type Version                        |
//! | 7      | 1    | VSI ID format (1 IPv4 .. 5 UUID)        |
//! | 8      | 16   | VSI ID                                  |
//! | 24     | 1    | filter info format (1 VID .. 4 G/MAC/VID) |
//! | 25     | 2    | number of entries, big endian           |
//! | 27     | n×k  | entries, k = 2, 8, 6 or 12 bytes        |
//!
//! so the value length is `25 + n×k` (lldpad `vsi22_tlv_sz`). Entries:
//! VID = `vlan[2]`; MAC/VID = `mac[6] vlan[2]`; GROUP/VID = `group[4]
//! vlan[2]`; GROUP/MAC/VID = `group[4] mac[6] vlan[2]` (lldpad
//! `vsi22_2tlv_fdata`). The 16-bit VLAN word is PS (bit 15), PCP (bits
//! 12–14), VID (bits 0–11) (lldpad `vdp22_get_ps`/`vdp22_get_vlanid`).
//!
//! # Status byte
//!
//! Bit 0x40 tells a response (set) from a request (clear). In a request,
//! 0x10 is the M-bit (migrate-to hint) and 0x20 the S-bit (migrate-from
//! hint) — lldpad `VDP22_MIGTO = 16`, `VDP22_MIGFROM = 32` in
//! include/qbg_vdp22def.h. In a response the same bits are hard error (0x10)
//! and keep (0x20) and the low nibble is the error code (lldpad
//! `VDP22_HARDBIT`, `VDP22_KEEPBIT`, `VDP22_ACKBIT`, `VDP22_STATUS_MASK` in
//! include/qbg_vdp22.h). 0x80 is reserved and carried through untouched.
//!
//! # VSI ID encodings
//!
//! IPv6, local and UUID use all 16 bytes. An IPv4 address is stored
//! IPv4-mapped (`::ffff:a.b.c.d`, bytes 10–11 = `ff ff`) and a MAC address
//! right-aligned behind ten zero bytes, as lldpad's `is_ipv4`/`is_mac`
//! (qbg/vdp22.c) expect. Decoding insists on exactly that padding so that
//! decode→encode gives back the same bytes.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::wire::{self, Reader, MAX_TLV_VALUE_LEN};
use crate::VdpError;

/// Ethertype of ECP (IEEE 802.1Qbg-2012 43.3), which carries VDP.
pub const ECP_ETHERTYPE: u16 = 0x8940;
/// The ECP subtype whose payload is VDP TLVs.
pub const ECP_SUBTYPE_VDP: u16 = 0x0001;

/// TLV type ending the sequence; what follows is padding.
pub const TLV_END: u8 = 0;
/// TLV type of the VSI Manager ID TLV.
pub const TLV_MANAGER_ID: u8 = 5;
/// TLV type of an organizationally defined TLV.
pub const TLV_ORGANIZATIONAL: u8 = 127;

/// Request status bit: the VSI is migrating to this station (M-bit).
pub const STATUS_MIGRATE_TO: u8 = 0x10;
/// Request status bit: the VSI is migrating away from this station (S-bit).
pub const STATUS_MIGRATE_FROM: u8 = 0x20;
/// Response status bit: the error is hard (same bit as the M-bit).
pub const STATUS_HARD_ERROR: u8 = 0x10;
/// Response status bit: the prior state is kept (same bit as the S-bit).
pub const STATUS_KEEP: u8 = 0x20;
/// Set in responses, clear in requests.
pub const STATUS_RESPONSE: u8 = 0x40;
/// Reserved; preserved as received.
pub const STATUS_RESERVED: u8 = 0x80;
/// A response's error code (0 = success).
pub const STATUS_ERROR_MASK: u8 = 0x0f;

/// Size of the VSI Manager ID and of the VSI ID.
pub const ID_LEN: usize = 16;
/// Value bytes of a VSI TLV before the filter entries.
pub const VSI_FIXED_LEN: usize = 25;

/// The VSI TLV's type: what the station asks the bridge to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    PreAssociate,
    PreAssociateWithReservation,
    Associate,
    DeAssociate,
}

impl Mode {
    /// The TLV type carrying this mode.
    pub fn tlv_type(self) -> u8 {
        match self {
            Mode::PreAssociate => 1,
            Mode::PreAssociateWithReservation => 2,
            Mode::Associate => 3,
            Mode::DeAssociate => 4,
        }
    }

    /// The mode a TLV type stands for, if it is a VSI TLV at all.
    pub fn from_tlv_type(t: u8) -> Option<Mode> {
        match t {
            1 => Some(Mode::PreAssociate),
            2 => Some(Mode::PreAssociateWithReservation),
            3 => Some(Mode::Associate),
            4 => Some(Mode::DeAssociate),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::PreAssociate => "pre-associate",
            Mode::PreAssociateWithReservation => "pre-associate-rr",
            Mode::Associate => "associate",
            Mode::DeAssociate => "de-associate",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A request's migration hint (status bits 0x10 / 0x20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Hint {
    #[default]
    None,
    /// M-bit: the VSI is arriving here.
    MigrateTo,
    /// S-bit: the VSI is leaving.
    MigrateFrom,
}

impl Hint {
    fn bits(self) -> u8 {
        match self {
            Hint::None => 0,
            Hint::MigrateTo => STATUS_MIGRATE_TO,
            Hint::MigrateFrom => STATUS_MIGRATE_FROM,
        }
    }
}

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hint::None => "none",
            Hint::MigrateTo => "migrate-to",
            Hint::MigrateFrom => "migrate-from",
        })
    }
}

/// The VSI ID with its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VsiId {
    /// Format 1.
    Ipv4(Ipv4Addr),
    /// Format 2.
    Ipv6(Ipv6Addr),
    /// Format 3.
    Mac([u8; 6]),
    /// Format 4: opaque, locally defined.
    Local([u8; 16]),
    /// Format 5: RFC 4122 UUID, network byte order.
    Uuid([u8; 16]),
}

impl VsiId {
    /// The VSI ID format byte.
    pub fn format(&self) -> u8 {
        match self {
            VsiId::Ipv4(_) => 1,
            VsiId::Ipv6(_) => 2,
            VsiId::Mac(_) => 3,
            VsiId::Local(_) => 4,
            VsiId::Uuid(_) => 5,
        }
    }

    /// The 16 bytes of the VSI ID field.
    pub fn to_bytes(&self) -> [u8; ID_LEN] {
        let mut out = [0u8; ID_LEN];
        match self {
            VsiId::Ipv4(a) => out = a.to_ipv6_mapped().octets(),
            VsiId::Ipv6(a) => out = a.octets(),
            VsiId::Mac(m) => out[10..].copy_from_slice(m),
            VsiId::Local(b) | VsiId::Uuid(b) => out = *b,
        }
        out
    }

    /// Interprets the VSI ID field; `offset` only labels errors.
    pub fn from_bytes(format: u8, b: &[u8; ID_LEN], offset: usize) -> Result<VsiId, VdpError> {
        let bad = |format, reason| VdpError::InvalidVsiId {
            offset,
            format,
            reason,
        };
        match format {
            1 => {
                if b[..10].iter().any(|&x| x != 0) || b[10..12] != [0xff, 0xff] {
                    return Err(bad("IPv4", "not ::ffff:a.b.c.d (IPv4-mapped)"));
                }
                Ok(VsiId::Ipv4(Ipv4Addr::new(b[12], b[13], b[14], b[15])))
            }
            2 => Ok(VsiId::Ipv6(Ipv6Addr::from(*b))),
            3 => {
                if b[..10].iter().any(|&x| x != 0) {
                    return Err(bad("MAC", "bytes 0-9 not zero"));
                }
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&b[10..]);
                Ok(VsiId::Mac(mac))
            }
            4 => Ok(VsiId::Local(*b)),
            5 => Ok(VsiId::Uuid(*b)),
            _ => Err(VdpError::UnknownVsiIdFormat { offset, format }),
        }
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

fn write_mac(f: &mut fmt::Formatter<'_>, m: &[u8; 6]) -> fmt::Result {
    write!(
        f,
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

impl fmt::Display for VsiId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VsiId::Ipv4(a) => write!(f, "ipv4:{a}"),
            VsiId::Ipv6(a) => write!(f, "ipv6:{a}"),
            VsiId::Mac(m) => {
                f.write_str("mac:")?;
                write_mac(f, m)
            }
            VsiId::Local(b) => {
                f.write_str("local:")?;
                write_hex(f, b)
            }
            VsiId::Uuid(b) => {
                f.write_str("uuid:")?;
                write_hex(f, &b[..4])?;
                f.write_str("-")?;
                write_hex(f, &b[4..6])?;
                f.write_str("-")?;
                write_hex(f, &b[6..8])?;
                f.write_str("-")?;
                write_hex(f, &b[8..10])?;
                f.write_str("-")?;
                write_hex(f, &b[10..])
            }
        }
    }
}

/// The filter info format byte's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FilterFormat {
    Vid,
    MacVid,
    GroupVid,
    GroupMacVid,
}

impl FilterFormat {
    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            FilterFormat::Vid => 1,
            FilterFormat::MacVid => 2,
            FilterFormat::GroupVid => 3,
            FilterFormat::GroupMacVid => 4,
        }
    }

    /// The format a byte stands for.
    pub fn from_code(c: u8) -> Option<FilterFormat> {
        match c {
            1 => Some(FilterFormat::Vid),
            2 => Some(FilterFormat::MacVid),
            3 => Some(FilterFormat::GroupVid),
            4 => Some(FilterFormat::GroupMacVid),
            _ => None,
        }
    }

    /// Bytes per entry (lldpad `vsi22_fdata_sz`).
    pub fn entry_len(self) -> usize {
        match self {
            FilterFormat::Vid => 2,
            FilterFormat::MacVid => 8,
            FilterFormat::GroupVid => 6,
            FilterFormat::GroupMacVid => 12,
        }
    }

    /// Most entries one TLV can carry in this format.
    pub fn max_entries(self) -> usize {
        (MAX_TLV_VALUE_LEN - VSI_FIXED_LEN) / self.entry_len()
    }
}

/// One filter entry. `ps`, `pcp` and `vid` are the VLAN word's PS bit,
/// priority (0..=7) and VLAN ID (0..=4095; 0 asks the bridge to pick one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Filter {
    Vid {
        ps: bool,
        pcp: u8,
        vid: u16,
    },
    MacVid {
        mac: [u8; 6],
        ps: bool,
        pcp: u8,
        vid: u16,
    },
    GroupVid {
        group: u32,
        ps: bool,
        pcp: u8,
        vid: u16,
    },
    GroupMacVid {
        group: u32,
        mac: [u8; 6],
        ps: bool,
        pcp: u8,
        vid: u16,
    },
}

impl Filter {
    /// The format this entry needs.
    pub fn format(&self) -> FilterFormat {
        match self {
            Filter::Vid { .. } => FilterFormat::Vid,
            Filter::MacVid { .. } => FilterFormat::MacVid,
            Filter::GroupVid { .. } => FilterFormat::GroupVid,
            Filter::GroupMacVid { .. } => FilterFormat::GroupMacVid,
        }
    }

    /// `(ps, pcp, vid)`.
    pub fn vlan(&self) -> (bool, u8, u16) {
        match *self {
            Filter::Vid { ps, pcp, vid }
            | Filter::MacVid { ps, pcp, vid, .. }
            | Filter::GroupVid { ps, pcp, vid, .. }
            | Filter::GroupMacVid { ps, pcp, vid, .. } => (ps, pcp, vid),
        }
    }

    fn vlan_word(&self, index: usize) -> Result<u16, VdpError> {
        let (ps, pcp, vid) = self.vlan();
        if pcp > 7 {
            return Err(VdpError::FilterOutOfRange {
                index,
                field: "pcp",
                value: pcp.into(),
                max: 7,
            });
        }
        if vid > 0x0fff {
            return Err(VdpError::FilterOutOfRange {
                index,
                field: "vid",
                value: vid.into(),
                max: 0x0fff,
            });
        }
        Ok((u16::from(ps) << 15) | (u16::from(pcp) << 12) | vid)
    }

    fn encode_into(&self, index: usize, out: &mut Vec<u8>) -> Result<(), VdpError> {
        let word = self.vlan_word(index)?.to_be_bytes();
        match self {
            Filter::Vid { .. } => {}
            Filter::MacVid { mac, .. } => out.extend_from_slice(mac),
            Filter::GroupVid { group, .. } => out.extend_from_slice(&group.to_be_bytes()),
            Filter::GroupMacVid { group, mac, .. } => {
                out.extend_from_slice(&group.to_be_bytes());
                out.extend_from_slice(mac);
            }
        }
        out.extend_from_slice(&word);
        Ok(())
    }

    fn decode(format: FilterFormat, r: &mut Reader<'_>) -> Result<Filter, VdpError> {
        let group = match format {
            FilterFormat::GroupVid | FilterFormat::GroupMacVid => r.u32("filter group ID")?,
            _ => 0,
        };
        let mac = match format {
            FilterFormat::MacVid | FilterFormat::GroupMacVid => r.array::<6>("filter MAC")?,
            _ => [0; 6],
        };
        let word = r.u16("filter VLAN")?;
        let ps = word & 0x8000 != 0;
        let pcp = ((word >> 12) & 0x7) as u8;
        let vid = word & 0x0fff;
        Ok(match format {
            FilterFormat::Vid => Filter::Vid { ps, pcp, vid },
            FilterFormat::MacVid => Filter::MacVid { mac, ps, pcp, vid },
            FilterFormat::GroupVid => Filter::GroupVid {
                group,
                ps,
                pcp,
                vid,
            },
            FilterFormat::GroupMacVid => Filter::GroupMacVid {
                group,
                mac,
                ps,
                pcp,
                vid,
            },
        })
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::GroupVid { group, .. } | Filter::GroupMacVid { group, .. } => {
                write!(f, "group {group} ")?
            }
            _ => {}
        }
        match self {
            Filter::MacVid { mac, .. } | Filter::GroupMacVid { mac, .. } => {
                f.write_str("mac ")?;
                write_mac(f, mac)?;
                f.write_str(" ")?;
            }
            _ => {}
        }
        let (ps, pcp, vid) = self.vlan();
        write!(f, "vid {vid} pcp {pcp}")?;
        if ps {
            f.write_str(" ps")?;
        }
        Ok(())
    }
}

/// One VSI TLV (types 1–4). The manager ID is not part of it on the wire:
/// it travels in the [`TLV_MANAGER_ID`] TLV ahead of the VSI TLVs, see
/// [`Vdpdu`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VsiTlv {
    pub mode: Mode,
    /// The raw status byte; see the module docs and the accessors.
    pub status: u8,
    /// 24 bits on the wire.
    pub type_id: u32,
    pub type_version: u8,
    pub vsi_id: VsiId,
    /// At least one; all of one [`FilterFormat`].
    pub filters: Vec<Filter>,
}

impl VsiTlv {
    /// True when the status byte marks a request (0x40 clear).
    pub fn is_request(&self) -> bool {
        self.status & STATUS_RESPONSE == 0
    }

    /// True when the status byte marks a response (0x40 set).
    pub fn is_response(&self) -> bool {
        !self.is_request()
    }

    /// The migration hint of a request. A response's 0x10/0x20 bits are
    /// hard-error/keep, not hints, so a response always reads as
    /// [`Hint::None`].
    pub fn hint(&self) -> Result<Hint, VdpError> {
        hint_of(self.status, 2)
    }

    /// Replaces the hint bits (0x10/0x20), leaving the others alone.
    pub fn set_hint(&mut self, hint: Hint) {
        self.status = (self.status & !(STATUS_MIGRATE_TO | STATUS_MIGRATE_FROM)) | hint.bits();
    }

    /// A response's error code (0 = success); `None` for a request.
    pub fn error_code(&self) -> Option<u8> {
        self.is_response()
            .then_some(self.status & STATUS_ERROR_MASK)
    }

    /// A response's keep bit: the bridge kept the state prior to the request.
    pub fn keep(&self) -> bool {
        self.is_response() && self.status & STATUS_KEEP != 0
    }

    /// A response's hard-error bit.
    pub fn hard_error(&self) -> bool {
        self.is_response() && self.status & STATUS_HARD_ERROR != 0
    }

    /// The filter format shared by all filters.
    pub fn filter_format(&self) -> Result<FilterFormat, VdpError> {
        let first = self
            .filters
            .first()
            .ok_or(VdpError::NoFilters { offset: 25 })?
            .format();
        for (index, f) in self.filters.iter().enumerate() {
            if f.format() != first {
                return Err(VdpError::MixedFilterFormats {
                    index,
                    expected: first.code(),
                    found: f.format().code(),
                });
            }
        }
        Ok(first)
    }

    /// The whole TLV, header included.
    pub fn encode(&self) -> Result<Vec<u8>, VdpError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the whole TLV to `out`; on error `out` is left as it was.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), VdpError> {
        self.hint()?;
        if self.type_id > 0x00ff_ffff {
            return Err(VdpError::FieldOutOfRange {
                field: "type_id",
                value: self.type_id.into(),
                max: 0x00ff_ffff,
            });
        }
        let format = self.filter_format()?;
        let len = VSI_FIXED_LEN + self.filters.len() * format.entry_len();
        if len > MAX_TLV_VALUE_LEN {
            return Err(VdpError::TooLong {
                what: "VSI TLV value",
                length: len,
                max: MAX_TLV_VALUE_LEN,
            });
        }
        let start = out.len();
        out.reserve(2 + len);
        out.extend_from_slice(&wire::header(self.mode.tlv_type(), len));
        out.push(self.status);
        out.extend_from_slice(&self.type_id.to_be_bytes()[1..]);
        out.push(self.type_version);
        out.push(self.vsi_id.format());
        out.extend_from_slice(&self.vsi_id.to_bytes());
        out.push(format.code());
        // len <= 511 bounds the count well below u16::MAX.
        out.extend_from_slice(&(self.filters.len() as u16).to_be_bytes());
        for (i, f) in self.filters.iter().enumerate() {
            if let Err(e) = f.encode_into(i, out) {
                out.truncate(start);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Decodes one VSI TLV at the start of `bytes`; returns it and the bytes
    /// it used (header included). Trailing bytes are left for the caller.
    pub fn decode(bytes: &[u8]) -> Result<(VsiTlv, usize), VdpError> {
        Self::decode_at(bytes, 0)
    }

    fn decode_at(bytes: &[u8], base: usize) -> Result<(VsiTlv, usize), VdpError> {
        let (tlv_type, len) = wire::read_header(bytes, base)?;
        let mode = Mode::from_tlv_type(tlv_type).ok_or(VdpError::UnexpectedTlvType {
            offset: base,
            found: tlv_type,
            expected: "a VSI TLV (1..=4)",
        })?;
        let mut outer = Reader::new(bytes, base);
        outer.take(2, "TLV header")?;
        let value = outer.take(len, "VSI TLV value")?;
        let mut r = Reader::new(value, base + 2);

        let status_at = r.offset();
        let status = r.u8("status")?;
        hint_of(status, status_at)?;
        let type_id = r.u24("VSI type ID")?;
        let type_version = r.u8("VSI type version")?;
        let format_at = r.offset();
        let id_format = r.u8("VSI ID format")?;
        let id_at = r.offset();
        let id_bytes = r.array::<ID_LEN>("VSI ID")?;
        let vsi_id = match VsiId::from_bytes(id_format, &id_bytes, id_at) {
            Err(VdpError::UnknownVsiIdFormat { format, .. }) => {
                return Err(VdpError::UnknownVsiIdFormat {
                    offset: format_at,
                    format,
                })
            }
            other => other?,
        };
        let ff_at = r.offset();
        let ff = r.u8("filter info format")?;
        let format = FilterFormat::from_code(ff).ok_or(VdpError::UnknownFilterFormat {
            offset: ff_at,
            format: ff,
        })?;
        let count_at = r.offset();
        let count = usize::from(r.u16("number of entries")?);
        if count == 0 {
            return Err(VdpError::NoFilters { offset: count_at });
        }
        let expected = VSI_FIXED_LEN + count * format.entry_len();
        if expected != len {
            return Err(VdpError::LengthMismatch {
                field: "number of entries",
                offset: count_at,
                declared: len,
                expected,
            });
        }
        let filters = (0..count)
            .map(|_| Filter::decode(format, &mut r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((
            VsiTlv {
                mode,
                status,
                type_id,
                type_version,
                vsi_id,
                filters,
            },
            2 + len,
        ))
    }
}

fn hint_of(status: u8, offset: usize) -> Result<Hint, VdpError> {
    if status & STATUS_RESPONSE != 0 {
        return Ok(Hint::None);
    }
    match (
        status & STATUS_MIGRATE_TO != 0,
        status & STATUS_MIGRATE_FROM != 0,
    ) {
        (false, false) => Ok(Hint::None),
        (true, false) => Ok(Hint::MigrateTo),
        (false, true) => Ok(Hint::MigrateFrom),
        (true, true) => Err(VdpError::ConflictingHints { offset, status }),
    }
}

impl fmt::Display for VsiTlv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mode)?;
        if self.is_request() {
            match hint_of(self.status, 0) {
                Ok(h) => write!(f, " request hint={h}")?,
                Err(_) => f.write_str(" request hint=invalid")?,
            }
        } else {
            write!(f, " response error={}", self.status & STATUS_ERROR_MASK)?;
            if self.keep() {
                f.write_str(" keep")?;
            }
            if self.hard_error() {
                f.write_str(" hard")?;
            }
        }
        write!(
            f,
            " vsi={} type={:#08x}/v{} filters=[",
            self.vsi_id, self.type_id, self.type_version
        )?;
        for (i, flt) in self.filters.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{flt}")?;
        }
        f.write_str("]")
    }
}

/// A TLV this codec does not interpret (organizationally defined or a type
/// the standard reserves), kept so a payload can be re-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RawTlv {
    pub tlv_type: u8,
    pub value: Vec<u8>,
}

/// The VDP TLVs of one ECPDU payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Vdpdu {
    /// From the manager ID TLV, which applies to every VSI TLV after it.
    pub manager_id: Option<[u8; ID_LEN]>,
    pub vsis: Vec<VsiTlv>,
    /// Uninterpreted TLVs, in order; re-encoded after the VSI TLVs.
    pub other: Vec<RawTlv>,
}

impl Vdpdu {
    /// Manager ID TLV (if any), VSI TLVs, other TLVs, End TLV.
    pub fn encode(&self) -> Result<Vec<u8>, VdpError> {
        let mut out = Vec::new();
        if let Some(id) = &self.manager_id {
            out.extend_from_slice(&encode_manager_id(id));
        }
        for v in &self.vsis {
            v.encode_into(&mut out)?;
        }
        for o in &self.other {
            // Types 0..=5 have meanings this codec owns; letting them through
            // here would re-encode as something that decodes differently.
            if o.tlv_type <= TLV_MANAGER_ID || o.tlv_type > 0x7f {
                return Err(VdpError::FieldOutOfRange {
                    field: "other TLV type (6..=127)",
                    value: o.tlv_type.into(),
                    max: 0x7f,
                });
            }
            if o.value.len() > MAX_TLV_VALUE_LEN {
                return Err(VdpError::TooLong {
                    what: "other TLV value",
                    length: o.value.len(),
                    max: MAX_TLV_VALUE_LEN,
                });
            }
            out.extend_from_slice(&wire::header(o.tlv_type, o.value.len()));
            out.extend_from_slice(&o.value);
        }
        out.extend_from_slice(&wire::header(TLV_END, 0));
        Ok(out)
    }

    /// Decodes the TLVs of an ECPDU payload up to an End TLV or the end of
    /// the bytes. Bytes after an End TLV are padding (ECP frames are padded
    /// to the Ethernet minimum) and are ignored, as is a lone trailing zero
    /// byte. A manager ID TLV, if present, must come first and only once
    /// (lldpad `vdp22_ecp22in` drops the PDU otherwise).
    pub fn decode(bytes: &[u8]) -> Result<Vdpdu, VdpError> {
        let mut pdu = Vdpdu::default();
        let mut pos = 0;
        let mut first = true;
        while pos < bytes.len() {
            let rest = &bytes[pos..];
            if rest == [0] {
                break;
            }
            let (tlv_type, len) = wire::read_header(rest, pos)?;
            if tlv_type == TLV_END {
                break;
            }
            match tlv_type {
                1..=4 => {
                    let (vsi, used) = VsiTlv::decode_at(rest, pos)?;
                    pdu.vsis.push(vsi);
                    pos += used;
                }
                TLV_MANAGER_ID => {
                    if !first {
                        return Err(VdpError::ManagerIdPlacement {
                            offset: pos,
                            reason: if pdu.manager_id.is_some() {
                                "a second manager ID TLV"
                            } else {
                                "not the first TLV"
                            },
                        });
                    }
                    pdu.manager_id = Some(decode_manager_id_at(rest, pos)?.0);
                    pos += 2 + ID_LEN;
                }
                _ => {
                    let mut r = Reader::new(rest, pos);
                    r.take(2, "TLV header")?;
                    let value = r.take(len, "TLV value")?.to_vec();
                    pdu.other.push(RawTlv { tlv_type, value });
                    pos += 2 + len;
                }
            }
            first = false;
        }
        Ok(pdu)
    }
}

/// The manager ID TLV: header (type 5, length 16) and the ID.
pub fn encode_manager_id(id: &[u8; ID_LEN]) -> [u8; 2 + ID_LEN] {
    let mut out = [0u8; 2 + ID_LEN];
    out[..2].copy_from_slice(&wire::header(TLV_MANAGER_ID, ID_LEN));
    out[2..].copy_from_slice(id);
    out
}

/// Decodes a manager ID TLV at the start of `bytes`; returns the ID and the
/// bytes used.
pub fn decode_manager_id(bytes: &[u8]) -> Result<([u8; ID_LEN], usize), VdpError> {
    decode_manager_id_at(bytes, 0)
}

fn decode_manager_id_at(bytes: &[u8], base: usize) -> Result<([u8; ID_LEN], usize), VdpError> {
    let (tlv_type, len) = wire::read_header(bytes, base)?;
    if tlv_type != TLV_MANAGER_ID {
        return Err(VdpError::UnexpectedTlvType {
            offset: base,
            found: tlv_type,
            expected: "the manager ID TLV (5)",
        });
    }
    if len != ID_LEN {
        return Err(VdpError::LengthMismatch {
            field: "manager ID",
            offset: base,
            declared: len,
            expected: ID_LEN,
        });
    }
    let mut r = Reader::new(bytes, base);
    r.take(2, "TLV header")?;
    Ok((r.array("manager ID")?, 2 + ID_LEN))
}

/// The VSI TLVs of an ECPDU payload, dropping the manager ID and any other
/// TLV; see [`Vdpdu::decode`] for the rules and to keep the manager ID.
pub fn decode_all(bytes: &[u8]) -> Result<Vec<VsiTlv>, VdpError> {
    Vdpdu::decode(bytes).map(|p| p.vsis)
}
