//! The pre-standard VDP 0.2 TLV: offsets from lldpad's `struct tlv_info_vdp`
//! and the EP2562973 Reason bit.

use tandem_vdp::vdp02::{
    offset, VdpTlv, FORMAT_MAC_VID, MODE_ASSOCIATE, OUI_QBG_DRAFT, REASON_MIGRATED,
    RESPONSE_INSUFFICIENT_RESOURCES, SUBTYPE_VDP,
};
use tandem_vdp::VdpError;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn sample() -> VdpTlv {
    VdpTlv {
        mode: MODE_ASSOCIATE,
        mgr_id: 7,
        type_id: [0x12, 0x34, 0x56],
        type_version: 9,
        instance: core::array::from_fn(|i| 0xa0 + i as u8),
        entries: vec![(MAC, 0x0064)],
        ..VdpTlv::default()
    }
}

#[test]
fn offsets_match_tlv_info_vdp() {
    let info = sample().encode_info().unwrap();
    assert_eq!(info.len(), 38);
    assert_eq!(&info[offset::OUI..offset::OUI + 3], &[0x00, 0x1b, 0x3f]);
    assert_eq!(info[offset::SUBTYPE], 2);
    assert_eq!(info[offset::MODE], 2);
    assert_eq!(info[offset::RESPONSE], 0);
    assert_eq!(info[offset::MGR_ID], 7);
    assert_eq!(
        &info[offset::TYPE_ID..offset::TYPE_ID + 3],
        &[0x12, 0x34, 0x56]
    );
    assert_eq!(info[offset::TYPE_VERSION], 9);
    assert_eq!(info[offset::INSTANCE], 0xa0);
    assert_eq!(info[offset::INSTANCE + 15], 0xaf);
    assert_eq!(info[offset::FORMAT], 2);
    assert_eq!(&info[offset::ENTRIES..offset::ENTRIES + 2], &[0x00, 0x01]);
    assert_eq!(&info[offset::FIRST_MAC..offset::FIRST_MAC + 6], &MAC);
    assert_eq!(
        &info[offset::FIRST_VLAN..offset::FIRST_VLAN + 2],
        &[0x00, 0x64]
    );
    // The listed offsets, spelled out once more as numbers.
    assert_eq!(
        [
            offset::OUI,
            offset::SUBTYPE,
            offset::MODE,
            offset::RESPONSE,
            offset::MGR_ID,
            offset::TYPE_ID,
            offset::TYPE_VERSION,
            offset::INSTANCE,
            offset::FORMAT,
            offset::ENTRIES,
            offset::FIRST_MAC,
            offset::FIRST_VLAN
        ],
        [0, 3, 4, 5, 6, 7, 10, 11, 27, 28, 30, 36]
    );
}

#[test]
fn full_tlv_golden() {
    let t = sample();
    let b = t.encode().unwrap();
    // 127 << 9 | 38 = 0xfe26
    #[rustfmt::skip]
    let want: [u8; 40] = [
        0xfe, 0x26,
        0x00, 0x1b, 0x3f, 0x02, 0x02, 0x00, 0x07, 0x12, 0x34, 0x56, 0x09,
        0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
        0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
        0x02, 0x00, 0x01,
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x00, 0x64,
    ];
    assert_eq!(b, want);
    assert_eq!(VdpTlv::decode(&b), Ok((t.clone(), 40)));
    assert_eq!(VdpTlv::decode_info(&b[2..]), Ok(t));
}

#[test]
fn reason_bit_round_trip() {
    let mut t = sample();
    assert!(!t.migrated());
    t.response = RESPONSE_INSUFFICIENT_RESOURCES;
    t.set_migrated(true);
    assert_eq!(t.response, REASON_MIGRATED | 2);
    assert_eq!(t.response_code(), 2);
    let b = t.encode().unwrap();
    assert_eq!(b[2 + offset::RESPONSE], 0x82);
    let (d, _) = VdpTlv::decode(&b).unwrap();
    assert!(d.migrated());
    assert_eq!(d.response_code(), 2);
    let mut d = d;
    d.set_migrated(false);
    assert_eq!(d.response, 2);
    assert_eq!(d.encode().unwrap()[2 + offset::RESPONSE], 0x02);
}

#[test]
fn several_entries() {
    let mut t = sample();
    t.entries.push(([0xff; 6], 0xffff));
    let b = t.encode().unwrap();
    assert_eq!(&b[..2], &[0xfe, 0x2e]); // 46 = 30 + 2 × 8
    assert_eq!(&b[2 + 38..], &[0xff; 8]);
    assert_eq!(VdpTlv::decode(&b).unwrap().0, t);
}

#[test]
fn decode_errors() {
    let good = sample().encode().unwrap();

    assert!(matches!(
        VdpTlv::decode(&good[..1]),
        Err(VdpError::Truncated {
            field: "TLV header",
            ..
        })
    ));
    assert_eq!(
        VdpTlv::decode(&good[..20]),
        Err(VdpError::Truncated {
            field: "VDP 0.2 information string",
            offset: 2,
            needed: 38,
            available: 18
        })
    );

    let mut b = good.clone();
    b[0] = 0x02; // LLDP type 1 (chassis ID)
    assert!(matches!(
        VdpTlv::decode(&b),
        Err(VdpError::UnexpectedTlvType {
            offset: 0,
            found: 1,
            ..
        })
    ));

    let mut b = good.clone();
    b[2 + offset::OUI + 2] = 0xc2;
    assert!(matches!(
        VdpTlv::decode(&b),
        Err(VdpError::NotVdp02 { offset: 2, .. })
    ));

    let mut b = good.clone();
    b[2 + offset::MODE] = 4;
    assert_eq!(
        VdpTlv::decode(&b),
        Err(VdpError::UnknownMode {
            offset: 6,
            value: 4
        })
    );

    let mut b = good.clone();
    b[2 + offset::FORMAT] = 1;
    assert_eq!(
        VdpTlv::decode(&b),
        Err(VdpError::UnknownFilterFormat {
            offset: 29,
            format: 1
        })
    );

    // Entries count running past the end of the information string.
    let mut b = good.clone();
    b[2 + offset::ENTRIES + 1] = 2;
    assert_eq!(
        VdpTlv::decode(&b),
        Err(VdpError::LengthMismatch {
            field: "number of entries",
            offset: 30,
            declared: 38,
            expected: 46
        })
    );
    b[2 + offset::ENTRIES + 1] = 0;
    assert_eq!(VdpTlv::decode(&b), Err(VdpError::NoFilters { offset: 30 }));

    // Information string shorter than the fixed part.
    assert!(matches!(
        VdpTlv::decode_info(&good[2..20]),
        Err(VdpError::Truncated {
            field: "VSI instance ID",
            offset: 11,
            ..
        })
    ));
}

#[test]
fn encode_errors() {
    let mut t = sample();
    t.entries.clear();
    assert!(matches!(t.encode(), Err(VdpError::NoFilters { .. })));
    t.entries = vec![(MAC, 1); 61];
    assert!(matches!(
        t.encode(),
        Err(VdpError::TooLong { length: 518, .. })
    ));
    t.entries.truncate(60);
    assert_eq!(t.encode().unwrap().len(), 2 + 30 + 480);

    let mut t = sample();
    t.format = 1;
    assert!(matches!(
        t.encode(),
        Err(VdpError::UnknownFilterFormat { .. })
    ));
    let mut t = sample();
    t.mode = 9;
    assert!(matches!(t.encode(), Err(VdpError::UnknownMode { .. })));
    let mut t = sample();
    t.oui = [0x00, 0x80, 0xc2];
    assert!(matches!(t.encode_info(), Err(VdpError::NotVdp02 { .. })));
}

#[test]
fn defaults_are_lldpad_constants() {
    let d = VdpTlv::default();
    assert_eq!(d.oui, OUI_QBG_DRAFT);
    assert_eq!(d.subtype, SUBTYPE_VDP);
    assert_eq!(d.format, FORMAT_MAC_VID);
    assert_eq!(sample().type_id_u32(), 0x123456);
}
