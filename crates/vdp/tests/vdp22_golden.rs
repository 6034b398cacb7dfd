//! Hand-computed bytes for the ratified (VDP22) TLVs and every error path.

use std::net::{Ipv4Addr, Ipv6Addr};

use tandem_vdp::vdp22::{
    decode_all, decode_manager_id, encode_manager_id, Filter, FilterFormat, Hint, Mode, RawTlv,
    Vdpdu, VsiId, VsiTlv, ECP_ETHERTYPE,
};
use tandem_vdp::VdpError;

const UUID: [u8; 16] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
];
const MAC: [u8; 6] = [0x52, 0x00, 0x00, 0x11, 0x22, 0x33];

fn assoc_to() -> VsiTlv {
    VsiTlv {
        mode: Mode::Associate,
        status: 0x10,
        type_id: 5,
        type_version: 4,
        vsi_id: VsiId::Uuid(UUID),
        filters: vec![Filter::MacVid {
            mac: MAC,
            ps: false,
            pcp: 0,
            vid: 200,
        }],
    }
}

/// Associate, hint=to, UUID VSI ID, one MAC/VID filter: what lldpad's
/// `vdptool -c mode=assoc -c typeid=5 -c typeidver=4 -c hints=to
/// -c filter=0-52:00:00:11:22:33-200` asks for (docs/vdptool.8 example with
/// the hint changed). Bytes computed by hand from the layout table.
#[rustfmt::skip]
const ASSOC_TO: [u8; 35] = [
    0x06, 0x21,             // type 3 << 9 | length 33 (25 + 8)
    0x10,                   // status: request, M-bit (migrate to)
    0x00, 0x00, 0x05,       // VSI type ID 5
    0x04,                   // type version 4
    0x05,                   // VSI ID format: UUID
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
    0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
    0x02,                   // filter info format: MAC/VID
    0x00, 0x01,             // one entry
    0x52, 0x00, 0x00, 0x11, 0x22, 0x33,
    0x00, 0xc8,             // PS 0, PCP 0, VID 200
];

#[test]
fn associate_migrate_to_golden() {
    let t = assoc_to();
    assert_eq!(t.hint(), Ok(Hint::MigrateTo));
    assert_eq!(t.encode().unwrap(), ASSOC_TO);
    let (d, used) = VsiTlv::decode(&ASSOC_TO).unwrap();
    assert_eq!(used, 35);
    assert_eq!(d, t);
    assert_eq!(ECP_ETHERTYPE, 0x8940);
}

#[test]
fn each_mode_sets_the_tlv_type() {
    for (mode, header0) in [
        (Mode::PreAssociate, 0x02),
        (Mode::PreAssociateWithReservation, 0x04),
        (Mode::Associate, 0x06),
        (Mode::DeAssociate, 0x08),
    ] {
        let mut t = assoc_to();
        t.mode = mode;
        let mut want = ASSOC_TO;
        want[0] = header0;
        assert_eq!(t.encode().unwrap(), want, "{mode:?}");
        assert_eq!(VsiTlv::decode(&want).unwrap().0.mode, mode);
    }
}

#[test]
fn hint_bits() {
    let mut t = assoc_to();
    t.set_hint(Hint::MigrateFrom);
    assert_eq!(t.status, 0x20);
    assert_eq!(t.encode().unwrap()[2], 0x20);
    t.set_hint(Hint::None);
    assert_eq!(t.status, 0x00);
    t.status = 0x80; // reserved bit survives set_hint
    t.set_hint(Hint::MigrateTo);
    assert_eq!(t.status, 0x90);

    let mut both = ASSOC_TO;
    both[2] = 0x30;
    assert_eq!(
        VsiTlv::decode(&both),
        Err(VdpError::ConflictingHints {
            offset: 2,
            status: 0x30
        })
    );
    t.status = 0x30;
    assert!(matches!(t.encode(), Err(VdpError::ConflictingHints { .. })));
}

#[test]
fn response_bits_are_keep_and_hard_error() {
    let mut resp = ASSOC_TO;
    resp[2] = 0x40 | 0x20 | 0x10 | 0x02;
    let (t, _) = VsiTlv::decode(&resp).unwrap();
    assert!(t.is_response());
    assert_eq!(t.hint(), Ok(Hint::None));
    assert_eq!(t.error_code(), Some(2));
    assert!(t.keep() && t.hard_error());
    assert_eq!(t.encode().unwrap(), resp);
    assert_eq!(assoc_to().error_code(), None);
}

fn vsi_with(filters: Vec<Filter>, vsi_id: VsiId) -> VsiTlv {
    VsiTlv {
        mode: Mode::PreAssociate,
        status: 0,
        type_id: 0x123456,
        type_version: 1,
        vsi_id,
        filters,
    }
}

#[rustfmt::skip]
fn fixed_part(header: [u8; 2], id_format: u8, id: [u8; 16], ff: u8, count: u16) -> Vec<u8> {
    let mut v = vec![header[0], header[1], 0x00, 0x12, 0x34, 0x56, 0x01, id_format];
    v.extend_from_slice(&id);
    v.push(ff);
    v.extend_from_slice(&count.to_be_bytes());
    v
}

fn roundtrip(t: &VsiTlv, want: &[u8]) {
    assert_eq!(t.encode().unwrap(), want);
    let (d, used) = VsiTlv::decode(want).unwrap();
    assert_eq!(&d, t);
    assert_eq!(used, want.len());
}

#[test]
fn vid_filter_golden() {
    let t = vsi_with(
        vec![Filter::Vid {
            ps: true,
            pcp: 5,
            vid: 100,
        }],
        VsiId::Local([0xab; 16]),
    );
    // type 1 << 9 | 27 = 0x021b; PS|PCP 5|VID 100 = 0x8000|0x5000|0x0064.
    let mut want = fixed_part([0x02, 0x1b], 4, [0xab; 16], 1, 1);
    want.extend_from_slice(&[0xd0, 0x64]);
    roundtrip(&t, &want);
}

#[test]
fn group_vid_filter_golden() {
    let t = vsi_with(
        vec![Filter::GroupVid {
            group: 0x0102_0304,
            ps: false,
            pcp: 3,
            vid: 4095,
        }],
        VsiId::Ipv4(Ipv4Addr::new(10, 0, 0, 1)),
    );
    // 25 + 6 = 31 = 0x1f; IPv4 as ::ffff:10.0.0.1.
    let mut id = [0u8; 16];
    id[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 1]);
    let mut want = fixed_part([0x02, 0x1f], 1, id, 3, 1);
    want.extend_from_slice(&[0x01, 0x02, 0x03, 0x04, 0x3f, 0xff]);
    roundtrip(&t, &want);
}

#[test]
fn group_mac_vid_filter_golden_two_entries() {
    let t = vsi_with(
        vec![
            Filter::GroupMacVid {
                group: 7,
                mac: MAC,
                ps: false,
                pcp: 7,
                vid: 1,
            },
            Filter::GroupMacVid {
                group: 0xffff_ffff,
                mac: [0xff; 6],
                ps: true,
                pcp: 0,
                vid: 0,
            },
        ],
        VsiId::Mac([2, 0, 0, 0, 0, 9]),
    );
    // 25 + 2 × 12 = 49 = 0x31; MAC right-aligned behind ten zeros.
    let mut id = [0u8; 16];
    id[10..].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    let mut want = fixed_part([0x02, 0x31], 3, id, 4, 2);
    want.extend_from_slice(&[0, 0, 0, 7, 0x52, 0x00, 0x00, 0x11, 0x22, 0x33, 0x70, 0x01]);
    want.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    want.extend_from_slice(&[0x80, 0x00]);
    roundtrip(&t, &want);
}

#[test]
fn mac_vid_filter_with_ipv6_id_golden() {
    let ip: Ipv6Addr = "fe80::1".parse().unwrap();
    let t = vsi_with(
        vec![Filter::MacVid {
            mac: MAC,
            ps: false,
            pcp: 1,
            vid: 0x0abc,
        }],
        VsiId::Ipv6(ip),
    );
    let mut want = fixed_part([0x02, 0x21], 2, ip.octets(), 2, 1);
    want.extend_from_slice(&MAC);
    want.extend_from_slice(&[0x1a, 0xbc]);
    roundtrip(&t, &want);
}

#[test]
fn short_buffers() {
    assert_eq!(
        VsiTlv::decode(&[]),
        Err(VdpError::Truncated {
            field: "TLV header",
            offset: 0,
            needed: 2,
            available: 0
        })
    );
    assert!(matches!(
        VsiTlv::decode(&[0x06]),
        Err(VdpError::Truncated {
            field: "TLV header",
            ..
        })
    ));
    for cut in 2..ASSOC_TO.len() {
        assert_eq!(
            VsiTlv::decode(&ASSOC_TO[..cut]),
            Err(VdpError::Truncated {
                field: "VSI TLV value",
                offset: 2,
                needed: 33,
                available: cut - 2
            }),
            "cut at {cut}"
        );
    }
}

#[test]
fn length_field_lying() {
    // Says 40 bytes, buffer holds 33 after the header.
    let mut b = ASSOC_TO;
    b[1] = 40;
    assert!(matches!(
        VsiTlv::decode(&b),
        Err(VdpError::Truncated {
            field: "VSI TLV value",
            needed: 40,
            available: 33,
            ..
        })
    ));
    // Says 34 with 34 present: one stray byte after the entries.
    let mut b = ASSOC_TO.to_vec();
    b[1] = 34;
    b.push(0);
    assert_eq!(
        VsiTlv::decode(&b),
        Err(VdpError::LengthMismatch {
            field: "number of entries",
            offset: 25,
            declared: 34,
            expected: 33
        })
    );
    // Says 20: too short even for the fixed fields.
    let mut b = ASSOC_TO;
    b[1] = 20;
    assert!(matches!(
        VsiTlv::decode(&b),
        Err(VdpError::Truncated {
            field: "VSI ID",
            offset: 8,
            needed: 16,
            available: 14
        })
    ));
    // A longer buffer than the TLV: the rest is the caller's.
    let mut b = ASSOC_TO.to_vec();
    b.extend_from_slice(&[1, 2, 3]);
    assert_eq!(VsiTlv::decode(&b).unwrap().1, 35);
}

#[test]
fn entries_count_running_past_the_end() {
    let mut b = ASSOC_TO;
    b[26] = 2;
    assert_eq!(
        VsiTlv::decode(&b),
        Err(VdpError::LengthMismatch {
            field: "number of entries",
            offset: 25,
            declared: 33,
            expected: 41
        })
    );
    b[26] = 0;
    assert_eq!(VsiTlv::decode(&b), Err(VdpError::NoFilters { offset: 25 }));
}

#[test]
fn unknown_formats() {
    let mut b = ASSOC_TO;
    b[7] = 6;
    assert_eq!(
        VsiTlv::decode(&b),
        Err(VdpError::UnknownVsiIdFormat {
            offset: 7,
            format: 6
        })
    );
    let mut b = ASSOC_TO;
    b[24] = 5;
    assert_eq!(
        VsiTlv::decode(&b),
        Err(VdpError::UnknownFilterFormat {
            offset: 24,
            format: 5
        })
    );
    let mut b = ASSOC_TO;
    b[0] = 0x0a; // type 5: the manager ID TLV is not a VSI TLV
    assert!(matches!(
        VsiTlv::decode(&b),
        Err(VdpError::UnexpectedTlvType {
            offset: 0,
            found: 5,
            ..
        })
    ));
}

#[test]
fn vsi_id_padding_is_checked() {
    let mut b = ASSOC_TO;
    b[7] = 1; // IPv4, but bytes are a UUID
    assert!(matches!(
        VsiTlv::decode(&b),
        Err(VdpError::InvalidVsiId {
            offset: 8,
            format: "IPv4",
            ..
        })
    ));
    b[7] = 3;
    assert!(matches!(
        VsiTlv::decode(&b),
        Err(VdpError::InvalidVsiId {
            offset: 8,
            format: "MAC",
            ..
        })
    ));
}

#[test]
fn encode_rejects_out_of_range_fields() {
    let mut t = assoc_to();
    t.filters = vec![Filter::Vid {
        ps: false,
        pcp: 0,
        vid: 4096,
    }];
    assert_eq!(
        t.encode(),
        Err(VdpError::FilterOutOfRange {
            index: 0,
            field: "vid",
            value: 4096,
            max: 4095
        })
    );
    t.filters = vec![
        Filter::Vid {
            ps: false,
            pcp: 0,
            vid: 1,
        },
        Filter::Vid {
            ps: false,
            pcp: 8,
            vid: 1,
        },
    ];
    assert!(matches!(
        t.encode(),
        Err(VdpError::FilterOutOfRange {
            index: 1,
            field: "pcp",
            ..
        })
    ));

    let mut t = assoc_to();
    t.type_id = 0x0100_0000;
    assert!(matches!(
        t.encode(),
        Err(VdpError::FieldOutOfRange {
            field: "type_id",
            ..
        })
    ));

    let mut t = assoc_to();
    t.filters.push(Filter::Vid {
        ps: false,
        pcp: 0,
        vid: 1,
    });
    assert_eq!(
        t.encode(),
        Err(VdpError::MixedFilterFormats {
            index: 1,
            expected: 2,
            found: 1
        })
    );

    let mut t = assoc_to();
    t.filters.clear();
    assert!(matches!(t.encode(), Err(VdpError::NoFilters { .. })));

    let mut t = assoc_to();
    let f = t.filters[0];
    t.filters = vec![f; FilterFormat::MacVid.max_entries()];
    assert_eq!(t.encode().unwrap().len(), 2 + 25 + 60 * 8);
    t.filters.push(f);
    assert_eq!(
        t.encode(),
        Err(VdpError::TooLong {
            what: "VSI TLV value",
            length: 25 + 61 * 8,
            max: 511
        })
    );
}

#[test]
fn encode_into_leaves_buffer_alone_on_error() {
    let mut t = assoc_to();
    t.filters.push(Filter::MacVid {
        mac: MAC,
        ps: false,
        pcp: 0,
        vid: 5000,
    });
    let mut out = vec![9, 9];
    assert!(t.encode_into(&mut out).is_err());
    assert_eq!(out, [9, 9]);
}

#[test]
fn manager_id_tlv() {
    let id = *b"tandem-manager-1";
    let b = encode_manager_id(&id);
    assert_eq!(&b[..2], &[0x0a, 0x10]); // 5 << 9 | 16
    assert_eq!(decode_manager_id(&b), Ok((id, 18)));
    let mut bad = b;
    bad[1] = 15;
    assert!(matches!(
        decode_manager_id(&bad),
        Err(VdpError::LengthMismatch {
            field: "manager ID",
            ..
        })
    ));
}

#[test]
fn whole_payload() {
    let id = [7u8; 16];
    let mut from = assoc_to();
    from.mode = Mode::DeAssociate;
    from.set_hint(Hint::MigrateFrom);
    let pdu = Vdpdu {
        manager_id: Some(id),
        vsis: vec![assoc_to(), from.clone()],
        other: vec![RawTlv {
            tlv_type: 127,
            value: vec![0x00, 0x00, 0x5e, 1, 2],
        }],
    };
    let mut bytes = pdu.encode().unwrap();
    let mut want = encode_manager_id(&id).to_vec();
    want.extend_from_slice(&ASSOC_TO);
    want.extend_from_slice(&from.encode().unwrap());
    want.extend_from_slice(&[0xfe, 0x05, 0x00, 0x00, 0x5e, 1, 2]);
    want.extend_from_slice(&[0, 0]);
    assert_eq!(bytes, want);
    // Padding after the End TLV is ignored.
    bytes.extend_from_slice(&[0; 9]);
    assert_eq!(Vdpdu::decode(&bytes).unwrap(), pdu);
    assert_eq!(decode_all(&bytes).unwrap(), vec![assoc_to(), from]);
    // No End TLV at all is fine too; so is an empty payload.
    let no_end = &want[..want.len() - 2];
    assert_eq!(Vdpdu::decode(no_end).unwrap(), pdu);
    assert_eq!(Vdpdu::decode(&[]).unwrap(), Vdpdu::default());
}

#[test]
fn manager_id_placement() {
    let id = [1u8; 16];
    let mut twice = encode_manager_id(&id).to_vec();
    twice.extend_from_slice(&encode_manager_id(&id));
    assert_eq!(
        Vdpdu::decode(&twice),
        Err(VdpError::ManagerIdPlacement {
            offset: 18,
            reason: "a second manager ID TLV"
        })
    );
    let mut late = ASSOC_TO.to_vec();
    late.extend_from_slice(&encode_manager_id(&id));
    assert_eq!(
        Vdpdu::decode(&late),
        Err(VdpError::ManagerIdPlacement {
            offset: 35,
            reason: "not the first TLV"
        })
    );
}

#[test]
fn errors_inside_a_payload_carry_absolute_offsets() {
    let mut b = encode_manager_id(&[0; 16]).to_vec();
    let mut v = ASSOC_TO;
    v[24] = 9;
    b.extend_from_slice(&v);
    assert_eq!(
        decode_all(&b),
        Err(VdpError::UnknownFilterFormat {
            offset: 18 + 24,
            format: 9
        })
    );
    // A lone trailing non-zero byte is a truncated header.
    let mut b = ASSOC_TO.to_vec();
    b.push(0x06);
    assert!(matches!(
        decode_all(&b),
        Err(VdpError::Truncated {
            field: "TLV header",
            offset: 35,
            ..
        })
    ));
}

#[test]
fn display_is_one_line() {
    let s = assoc_to().to_string();
    assert_eq!(
        s,
        "associate request hint=migrate-to vsi=uuid:00112233-4455-6677-8899-aabbccddeeff \
         type=0x000005/v4 filters=[mac 52:00:00:11:22:33 vid 200 pcp 0]"
    );
    assert!(!s.contains('\n'));
}

#[test]
fn json_round_trip() {
    let pdu = Vdpdu {
        manager_id: Some([3; 16]),
        vsis: vec![assoc_to()],
        other: vec![],
    };
    let json = serde_json::to_string(&pdu).unwrap();
    assert!(json.contains("\"Associate\""));
    assert_eq!(serde_json::from_str::<Vdpdu>(&json).unwrap(), pdu);
}
