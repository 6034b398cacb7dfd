//! The pre-standard VDP TLV ("VDP 0.2", IEEE 802.1Qbg draft 0.2), carried in
//! an organizationally specific LLDP TLV (type 127) under the draft OUI
//! 00-1b-3f, subtype 2, as lldpad's `struct tlv_info_vdp`
//! (include/qbg_vdp.h) and `vdp_bld_vsi_tlv` (qbg/vdp.c) lay it out.
//!
//! # Layout
//!
//! Offsets within the TLV information string (add 2 for the whole TLV, whose
//! first two bytes are the LLDP header `127 << 9 | length`):
//!
//! | offset | size | field                                  |
//! |-------:|-----:|----------------------------------------|
//! | 0      | 3    | OUI (00-1b-3f)                         |
//! | 3      | 1    | subtype (2)                            |
//! | 4      | 1    | mode (0 pre-assoc, 1 pre-assoc RR, 2 assoc, 3 de-assoc) |
//! | 5      | 1    | response ("Reason" in EP2562973)       |
//! | 6      | 1    | VSI manager ID                         |
//! | 7      | 3    | VSI type ID, big endian                |
//! | 10     | 1    | VSI type version                       |
//! | 11     | 16   | VSI instance ID                        |
//! | 27     | 1    | filter info format (2 = MAC/VLAN)      |
//! | 28     | 2    | number of entries, big endian          |
//! | 30     | 8×n  | entries: MAC (6), VLAN (2, big endian) |
//!
//! lldpad's `vdp_validate_tlv` requires the format to be MAC/VLAN, at least
//! one entry, and the length to hold exactly the counted entries; this
//! decoder does the same.

use serde::{Deserialize, Serialize};

use crate::wire::{self, Reader, MAX_TLV_VALUE_LEN};
use crate::VdpError;

/// LLDP TLV type of an organizationally specific TLV.
pub const LLDP_TLV_ORG_SPECIFIC: u8 = 127;
/// The 802.1Qbg drafts' OUI (lldpad `OUI_IEEE_8021Qbg`).
pub const OUI_QBG_DRAFT: [u8; 3] = [0x00, 0x1b, 0x3f];
/// Subtype of the VDP TLV under that OUI (lldpad `LLDP_VDP_SUBTYPE`).
pub const SUBTYPE_VDP: u8 = 2;
/// The only filter info format VDP 0.2 carries: MAC/VLAN pairs.
pub const FORMAT_MAC_VID: u8 = 2;

pub const MODE_PRE_ASSOCIATE: u8 = 0;
pub const MODE_PRE_ASSOCIATE_WITH_RR: u8 = 1;
pub const MODE_ASSOCIATE: u8 = 2;
pub const MODE_DE_ASSOCIATE: u8 = 3;

/// Response codes (lldpad `VDP_RESPONSE_*`); a station's request sends 0.
pub const RESPONSE_SUCCESS: u8 = 0;
pub const RESPONSE_INVALID_FORMAT: u8 = 1;
pub const RESPONSE_INSUFFICIENT_RESOURCES: u8 = 2;
pub const RESPONSE_UNUSED_VTID: u8 = 3;
pub const RESPONSE_VTID_VIOLATION: u8 = 4;
pub const RESPONSE_VTID_VERSION_VIOLATION: u8 = 5;
pub const RESPONSE_OUT_OF_SYNC: u8 = 6;

/// EP2562973 variant (b): this bit of the response ("Reason") byte set means
/// the VM was migrated here, clear that it is newly created.
///
/// The response codes lldpad knows on the wire are the values 0..=6, which
/// live in bits 0–2 (its 0xfe/0xff are in-memory markers, never sent: a
/// station always transmits 0). The top bit is the one furthest from that
/// code space, so `response & 0x7f` still reads as the code; note that an
/// unmodified lldpad rejects a TLV whose response exceeds 6, which is why
/// the bit only belongs on links where both ends know the variant.
pub const REASON_MIGRATED: u8 = 0x80;

/// Field offsets within the information string.
pub mod offset {
    pub const OUI: usize = 0;
    pub const SUBTYPE: usize = 3;
    pub const MODE: usize = 4;
    pub const RESPONSE: usize = 5;
    pub const MGR_ID: usize = 6;
    pub const TYPE_ID: usize = 7;
    pub const TYPE_VERSION: usize = 10;
    pub const INSTANCE: usize = 11;
    pub const FORMAT: usize = 27;
    pub const ENTRIES: usize = 28;
    pub const FIRST_MAC: usize = 30;
    pub const FIRST_VLAN: usize = 36;
}

/// Information string bytes before the entries.
pub const INFO_FIXED_LEN: usize = 30;
/// Bytes per MAC/VLAN entry.
pub const ENTRY_LEN: usize = 8;
/// Most entries one LLDP TLV can carry.
pub const MAX_ENTRIES: usize = (MAX_TLV_VALUE_LEN - INFO_FIXED_LEN) / ENTRY_LEN;

/// The VDP 0.2 TLV's fields, kept as the raw bytes lldpad uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VdpTlv {
    pub oui: [u8; 3],
    pub subtype: u8,
    pub mode: u8,
    pub response: u8,
    pub mgr_id: u8,
    pub type_id: [u8; 3],
    pub type_version: u8,
    pub instance: [u8; 16],
    pub format: u8,
    /// MAC address and the raw 16-bit VLAN field.
    pub entries: Vec<([u8; 6], u16)>,
}

impl Default for VdpTlv {
    /// A pre-associate request with the draft OUI, subtype and MAC/VLAN
    /// format filled in and no entries yet.
    fn default() -> Self {
        VdpTlv {
            oui: OUI_QBG_DRAFT,
            subtype: SUBTYPE_VDP,
            mode: MODE_PRE_ASSOCIATE,
            response: RESPONSE_SUCCESS,
            mgr_id: 0,
            type_id: [0; 3],
            type_version: 0,
            instance: [0; 16],
            format: FORMAT_MAC_VID,
            entries: Vec::new(),
        }
    }
}

impl VdpTlv {
    /// EP2562973's Reason bit: the VM was migrated here (not newly created).
    pub fn migrated(&self) -> bool {
        self.response & REASON_MIGRATED != 0
    }

    /// Sets or clears [`REASON_MIGRATED`], leaving the response code alone.
    pub fn set_migrated(&mut self, migrated: bool) {
        if migrated {
            self.response |= REASON_MIGRATED;
        } else {
            self.response &= !REASON_MIGRATED;
        }
    }

    /// The response code without the Reason bit.
    pub fn response_code(&self) -> u8 {
        self.response & !REASON_MIGRATED
    }

    /// The type ID as a number.
    pub fn type_id_u32(&self) -> u32 {
        let [a, b, c] = self.type_id;
        u32::from_be_bytes([0, a, b, c])
    }

    /// Length of the information string.
    pub fn info_len(&self) -> usize {
        INFO_FIXED_LEN + self.entries.len() * ENTRY_LEN
    }

    fn check(&self) -> Result<(), VdpError> {
        if self.oui != OUI_QBG_DRAFT || self.subtype != SUBTYPE_VDP {
            return Err(VdpError::NotVdp02 {
                offset: offset::OUI,
                oui: self.oui,
                subtype: self.subtype,
            });
        }
        if self.mode > MODE_DE_ASSOCIATE {
            return Err(VdpError::UnknownMode {
                offset: offset::MODE,
                value: self.mode,
            });
        }
        if self.format != FORMAT_MAC_VID {
            return Err(VdpError::UnknownFilterFormat {
                offset: offset::FORMAT,
                format: self.format,
            });
        }
        if self.entries.is_empty() {
            return Err(VdpError::NoFilters {
                offset: offset::ENTRIES,
            });
        }
        if self.entries.len() > MAX_ENTRIES {
            return Err(VdpError::TooLong {
                what: "VDP 0.2 information string",
                length: self.info_len(),
                max: MAX_TLV_VALUE_LEN,
            });
        }
        Ok(())
    }

    /// The information string alone (what follows the LLDP TLV header).
    pub fn encode_info(&self) -> Result<Vec<u8>, VdpError> {
        self.check()?;
        let mut out = Vec::with_capacity(self.info_len());
        out.extend_from_slice(&self.oui);
        out.push(self.subtype);
        out.push(self.mode);
        out.push(self.response);
        out.push(self.mgr_id);
        out.extend_from_slice(&self.type_id);
        out.push(self.type_version);
        out.extend_from_slice(&self.instance);
        out.push(self.format);
        // check() bounds the count by MAX_ENTRIES.
        out.extend_from_slice(&(self.entries.len() as u16).to_be_bytes());
        for (mac, vlan) in &self.entries {
            out.extend_from_slice(mac);
            out.extend_from_slice(&vlan.to_be_bytes());
        }
        Ok(out)
    }

    /// The whole LLDP TLV: header (type 127) and information string.
    pub fn encode(&self) -> Result<Vec<u8>, VdpError> {
        let info = self.encode_info()?;
        let mut out = Vec::with_capacity(2 + info.len());
        out.extend_from_slice(&wire::header(LLDP_TLV_ORG_SPECIFIC, info.len()));
        out.extend_from_slice(&info);
        Ok(out)
    }

    /// Decodes a whole LLDP TLV at the start of `bytes`; returns it and the
    /// bytes used. Error offsets count from the TLV header.
    pub fn decode(bytes: &[u8]) -> Result<(VdpTlv, usize), VdpError> {
        let (tlv_type, len) = wire::read_header(bytes, 0)?;
        if tlv_type != LLDP_TLV_ORG_SPECIFIC {
            return Err(VdpError::UnexpectedTlvType {
                offset: 0,
                found: tlv_type,
                expected: "an organizationally specific LLDP TLV (127)",
            });
        }
        let mut r = Reader::new(bytes, 0);
        r.take(2, "TLV header")?;
        let info = r.take(len, "VDP 0.2 information string")?;
        Ok((Self::decode_info_at(info, 2)?, 2 + len))
    }

    /// Decodes exactly one information string (the TLV's value). Error
    /// offsets count from its first byte.
    pub fn decode_info(info: &[u8]) -> Result<VdpTlv, VdpError> {
        Self::decode_info_at(info, 0)
    }

    fn decode_info_at(info: &[u8], base: usize) -> Result<VdpTlv, VdpError> {
        let mut r = Reader::new(info, base);
        let oui = r.array::<3>("OUI")?;
        let subtype = r.u8("subtype")?;
        if oui != OUI_QBG_DRAFT || subtype != SUBTYPE_VDP {
            return Err(VdpError::NotVdp02 {
                offset: base + offset::OUI,
                oui,
                subtype,
            });
        }
        let mode = r.u8("mode")?;
        if mode > MODE_DE_ASSOCIATE {
            return Err(VdpError::UnknownMode {
                offset: base + offset::MODE,
                value: mode,
            });
        }
        let response = r.u8("response")?;
        let mgr_id = r.u8("VSI manager ID")?;
        let type_id = r.array::<3>("VSI type ID")?;
        let type_version = r.u8("VSI type version")?;
        let instance = r.array::<16>("VSI instance ID")?;
        let format = r.u8("filter info format")?;
        if format != FORMAT_MAC_VID {
            return Err(VdpError::UnknownFilterFormat {
                offset: base + offset::FORMAT,
                format,
            });
        }
        let count = usize::from(r.u16("number of entries")?);
        if count == 0 {
            return Err(VdpError::NoFilters {
                offset: base + offset::ENTRIES,
            });
        }
        let expected = INFO_FIXED_LEN + count * ENTRY_LEN;
        if expected != info.len() {
            return Err(VdpError::LengthMismatch {
                field: "number of entries",
                offset: base + offset::ENTRIES,
                declared: info.len(),
                expected,
            });
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let mac = r.array::<6>("entry MAC")?;
            let vlan = r.u16("entry VLAN")?;
            entries.push((mac, vlan));
        }
        Ok(VdpTlv {
            oui,
            subtype,
            mode,
            response,
            mgr_id,
            type_id,
            type_version,
            instance,
            format,
            entries,
        })
    }
}
