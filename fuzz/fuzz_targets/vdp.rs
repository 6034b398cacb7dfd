//! Bytes from the wire as a VDP22 VSI TLV, as an ECP payload's TLV sequence
//! and as a VDP 0.2 LLDP TLV: refused with an error, or decoded into values
//! that encode back to exactly the bytes consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_vdp::vdp02::VdpTlv;
use tandem_vdp::vdp22::{Vdpdu, VsiTlv};

fuzz_target!(|data: &[u8]| {
    if let Ok((tlv, used)) = VsiTlv::decode(data) {
        let again = tlv.encode().expect("a decoded VSI TLV re-encodes");
        assert_eq!(again, &data[..used]);
    }
    if let Ok(pdu) = Vdpdu::decode(data) {
        let bytes = pdu.encode().expect("a decoded payload re-encodes");
        assert_eq!(Vdpdu::decode(&bytes).ok(), Some(pdu));
    }
    if let Ok((tlv, used)) = VdpTlv::decode(data) {
        let again = tlv.encode().expect("a decoded VDP 0.2 TLV re-encodes");
        assert_eq!(again, &data[..used]);
    }
    let _ = VdpTlv::decode_info(data);
});
