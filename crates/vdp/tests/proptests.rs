//! Round trips for arbitrary valid TLVs; no panic on arbitrary bytes.

use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use tandem_vdp::vdp02::{self, VdpTlv};
use tandem_vdp::vdp22::{
    Filter, FilterFormat, Mode, Vdpdu, VsiId, VsiTlv, STATUS_MIGRATE_FROM, STATUS_MIGRATE_TO,
    STATUS_RESPONSE,
};

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::PreAssociate),
        Just(Mode::PreAssociateWithReservation),
        Just(Mode::Associate),
        Just(Mode::DeAssociate),
    ]
}

fn status() -> impl Strategy<Value = u8> {
    any::<u8>().prop_map(|s| {
        let both = STATUS_MIGRATE_TO | STATUS_MIGRATE_FROM;
        if s & STATUS_RESPONSE == 0 && s & both == both {
            s & !STATUS_MIGRATE_FROM
        } else {
            s
        }
    })
}

fn vsi_id() -> impl Strategy<Value = VsiId> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| VsiId::Ipv4(Ipv4Addr::from(b))),
        any::<[u8; 16]>().prop_map(|b| VsiId::Ipv6(Ipv6Addr::from(b))),
        any::<[u8; 6]>().prop_map(VsiId::Mac),
        any::<[u8; 16]>().prop_map(VsiId::Local),
        any::<[u8; 16]>().prop_map(VsiId::Uuid),
    ]
}

fn filter(format: FilterFormat) -> impl Strategy<Value = Filter> {
    (
        any::<u32>(),
        any::<[u8; 6]>(),
        any::<bool>(),
        0u8..8,
        0u16..4096,
    )
        .prop_map(move |(group, mac, ps, pcp, vid)| match format {
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

fn filters() -> impl Strategy<Value = Vec<Filter>> {
    prop_oneof![
        Just(FilterFormat::Vid),
        Just(FilterFormat::MacVid),
        Just(FilterFormat::GroupVid),
        Just(FilterFormat::GroupMacVid),
    ]
    .prop_flat_map(|f| prop::collection::vec(filter(f), 1..=f.max_entries()))
}

fn vsi_tlv() -> impl Strategy<Value = VsiTlv> {
    (
        mode(),
        status(),
        0u32..=0xff_ffff,
        any::<u8>(),
        vsi_id(),
        filters(),
    )
        .prop_map(
            |(mode, status, type_id, type_version, vsi_id, filters)| VsiTlv {
                mode,
                status,
                type_id,
                type_version,
                vsi_id,
                filters,
            },
        )
}

fn vdp02_tlv() -> impl Strategy<Value = VdpTlv> {
    (
        0u8..4,
        any::<u8>(),
        any::<u8>(),
        any::<[u8; 3]>(),
        any::<u8>(),
        any::<[u8; 16]>(),
        prop::collection::vec((any::<[u8; 6]>(), any::<u16>()), 1..=vdp02::MAX_ENTRIES),
    )
        .prop_map(
            |(mode, response, mgr_id, type_id, type_version, instance, entries)| VdpTlv {
                mode,
                response,
                mgr_id,
                type_id,
                type_version,
                instance,
                entries,
                ..VdpTlv::default()
            },
        )
}

proptest! {
    #[test]
    fn vsi_tlv_round_trips(t in vsi_tlv()) {
        let b = t.encode().unwrap();
        prop_assert_eq!(b.len(), 2 + usize::from(u16::from_be_bytes([b[0], b[1]]) & 0x1ff));
        let (d, used) = VsiTlv::decode(&b).unwrap();
        prop_assert_eq!(used, b.len());
        prop_assert_eq!(d, t);
    }

    #[test]
    fn vdpdu_round_trips(
        manager_id in proptest::option::of(any::<[u8; 16]>()),
        vsis in prop::collection::vec(vsi_tlv(), 0..4),
    ) {
        let pdu = Vdpdu { manager_id, vsis, other: vec![] };
        let b = pdu.encode().unwrap();
        prop_assert_eq!(Vdpdu::decode(&b).unwrap(), pdu);
    }

    #[test]
    fn vdp02_round_trips(t in vdp02_tlv()) {
        let b = t.encode().unwrap();
        let (d, used) = VdpTlv::decode(&b).unwrap();
        prop_assert_eq!(used, b.len());
        prop_assert_eq!(&d, &t);
        prop_assert_eq!(d.migrated(), t.response & vdp02::REASON_MIGRATED != 0);
    }

    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        // Whatever decodes re-encodes to exactly the bytes it consumed.
        if let Ok((t, used)) = VsiTlv::decode(&bytes) {
            prop_assert_eq!(t.encode().unwrap(), &bytes[..used]);
        }
        if let Ok(p) = Vdpdu::decode(&bytes) {
            prop_assert!(p.encode().is_ok());
        }
        if let Ok((t, used)) = VdpTlv::decode(&bytes) {
            prop_assert_eq!(t.encode().unwrap(), &bytes[..used]);
        }
        let _ = VdpTlv::decode_info(&bytes);
    }

    #[test]
    fn mutated_valid_bytes_never_panic(
        t in vsi_tlv(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut b = t.encode().unwrap();
        for (i, v) in flips {
            let i = i.index(b.len());
            b[i] = v;
        }
        let b = &b[..cut.index(b.len() + 1)];
        if let Ok((d, used)) = VsiTlv::decode(b) {
            prop_assert_eq!(d.encode().unwrap(), &b[..used]);
        }
        let _ = Vdpdu::decode(b);
    }
}
