//! The VSI Discovery Protocol's TLVs, as bytes and back, without I/O.
//!
//! VDP is how a station (here: the host running QEMU guests) tells its
//! adjacent bridge that a virtual station interface — a VM's NIC — is being
//! pre-associated, associated or de-associated, so the bridge can apply the
//! VSI type's port profile before traffic flows. For live migration the
//! association carries a hint: the destination's request says "migrate to",
//! the source's "migrate from".
//!
//! This crate owns the codecs for two generations of the TLV:
//!
//! * [`vdp22`]: IEEE 802.1Qbg-2012 clause 41, the ratified VDP carried over
//!   ECP (Ethertype [`vdp22::ECP_ETHERTYPE`]): the VSI TLVs (modes 1–4), the
//!   VSI Manager ID TLV (type 5), the migration hints in the status byte,
//!   all five VSI ID formats and all four filter info formats.
//! * [`vdp02`]: the pre-standard VDP 0.2 TLV that lldpad still speaks, an
//!   organizationally specific LLDP TLV, including the "Reason" bit of
//!   EP2562973 telling a migrated VM from a newly created one
//!   ([`vdp02::REASON_MIGRATED`]).
//!
//! Each module's docs give the byte offsets used and where they were
//! checked (lldpad's sources, Wireshark's ECP dissector).
//!
//! Decoding never panics and returns a [`VdpError`] naming the field and its
//! byte offset; encoding refuses values that do not fit their fields, so
//! whatever encodes decodes back to the same value.
//!
//! Deliberately not here: the ECP transport (sequence numbers,
//! acknowledgements, retransmission), LLDP and the EVB TLV negotiation that
//! decides whether VDP runs at all, the station and bridge state machines
//! and their timers, and any database of VSI types or associations.

#![forbid(unsafe_code)]

mod error;
pub mod vdp02;
pub mod vdp22;
mod wire;

pub use error::VdpError;
pub use wire::MAX_TLV_VALUE_LEN;
