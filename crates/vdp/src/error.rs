//! The one error type of the crate.
//!
//! Offsets in decode errors count from the first byte of the slice handed to
//! the decoder (for [`crate::vdp22::Vdpdu::decode`], the first byte of the
//! ECP payload), so a log line can be matched against a hex dump directly.

/// Why bytes could not be decoded, or a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VdpError {
    /// The buffer (or the TLV's declared length) ends inside a field.
    #[error("{field} at offset {offset}: needs {needed} bytes, only {available} left")]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    /// The TLV length field disagrees with what the entries count implies.
    #[error(
        "{field} at offset {offset}: TLV length field says {declared} bytes, \
         the entries count implies {expected}"
    )]
    LengthMismatch {
        field: &'static str,
        offset: usize,
        declared: usize,
        expected: usize,
    },
    /// A TLV of another kind where a particular one was required.
    #[error("TLV header at offset {offset}: type {found} is not {expected}")]
    UnexpectedTlvType {
        offset: usize,
        found: u8,
        expected: &'static str,
    },
    /// An organizationally specific TLV that is not the VDP 0.2 one.
    #[error("OUI/subtype at offset {offset}: {oui:02x?}/{subtype} is not the VDP 0.2 TLV")]
    NotVdp02 {
        offset: usize,
        oui: [u8; 3],
        subtype: u8,
    },
    /// A VDP 0.2 mode byte outside 0..=3.
    #[error("mode at offset {offset}: unknown value {value}")]
    UnknownMode { offset: usize, value: u8 },
    /// The VSI ID format byte is not 1..=5.
    #[error("VSI ID format at offset {offset}: unknown value {format}")]
    UnknownVsiIdFormat { offset: usize, format: u8 },
    /// The 16 VSI ID bytes do not have the padding their format requires.
    #[error("VSI ID at offset {offset}: not a valid {format} identifier ({reason})")]
    InvalidVsiId {
        offset: usize,
        format: &'static str,
        reason: &'static str,
    },
    /// The filter info format byte is not one this codec can lay out.
    #[error("filter info format at offset {offset}: unknown value {format}")]
    UnknownFilterFormat { offset: usize, format: u8 },
    /// A TLV with zero filter entries (lldpad drops such TLVs).
    #[error("number of entries at offset {offset} is 0: a VSI TLV carries at least one")]
    NoFilters { offset: usize },
    /// A request's status byte with both migration hints set.
    #[error(
        "status at offset {offset} ({status:#04x}): migrate-to (0x10) and \
         migrate-from (0x20) hints both set"
    )]
    ConflictingHints { offset: usize, status: u8 },
    /// Filters of different formats in one TLV, which has a single format byte.
    #[error(
        "filter {index}: format {found} differs from the first filter's {expected}; \
         one TLV carries one filter format"
    )]
    MixedFilterFormats {
        index: usize,
        expected: u8,
        found: u8,
    },
    /// A value wider than its field on the wire.
    #[error("{field} = {value} exceeds its maximum {max}")]
    FieldOutOfRange {
        field: &'static str,
        value: u64,
        max: u64,
    },
    /// One filter's value wider than its field on the wire.
    #[error("filter {index}: {field} = {value} exceeds its maximum {max}")]
    FilterOutOfRange {
        index: usize,
        field: &'static str,
        value: u64,
        max: u64,
    },
    /// More data than a 9-bit TLV length can describe.
    #[error("{what}: {length} bytes do not fit the 9-bit TLV length field (max {max})")]
    TooLong {
        what: &'static str,
        length: usize,
        max: usize,
    },
    /// A manager ID TLV that is not the first TLV, or a second one.
    #[error("manager ID TLV at offset {offset}: {reason}")]
    ManagerIdPlacement { offset: usize, reason: &'static str },
}
