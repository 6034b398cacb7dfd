//! Entry points for the switch's fuzz targets in the top-level `fuzz/`
//! workspace (and the property tests that run the same code on stable in
//! every test run). Test and fuzz code only: compiled with `cfg(test)`,
//! `cfg(fuzzing)` (cargo-fuzz) or the `fault-injection` feature.

use std::sync::Arc;
use std::time::Instant;

use crate::config::{PortGroup, SwitchDocument, VlanMode};
use crate::frame::{self, Mac};
use crate::lldp::{self, Heard};
use crate::offload::{self, RxOffloads, TxOffloads, VnetHdr};
use crate::port::{Ingress, MAX_FRAME};
use crate::switch::{PortKind, Switch};

/// Splits `data` into frames (a length byte pair, then the frame) and feeds
/// each into a small switch from a port chosen by the first byte; when its
/// top bit is set the frame starts with a virtio-net header asking for
/// offloads, validated as a VM port would. Checks what comes out: every
/// frame leaving an access port is untagged, every frame leaving the trunk
/// carries an allowed tag, nothing is oversize, and offload work reaches
/// only the port that accepts it.
const ALL_TX: TxOffloads = TxOffloads {
    csum: true,
    tso4: true,
    tso6: true,
};
const OFFLOADS: RxOffloads = RxOffloads {
    csum: true,
    tso4: true,
    tso6: true,
};

pub fn ingress_frames(data: &[u8]) {
    let mut a = PortGroup::named("a");
    a.vlan = Some(10);
    let mut b = PortGroup::named("b");
    b.vlan = Some(20);
    b.allow_mac_change = true;
    b.learn_limit = 4;
    let mut t = PortGroup::named("t");
    t.vlan_mode = VlanMode::Trunk;
    t.allowed_vlans = vec![10, 20];
    t.native_vlan = Some(30);
    let doc = SwitchDocument {
        port_groups: vec![a, b, t],
        ..Default::default()
    };
    let Ok(sw) = Switch::new(doc) else { return };
    let mut ports = Vec::new();
    for (i, (kind, group)) in [
        (
            PortKind::Vm {
                vm: "v1".into(),
                nic: 0,
                mac: Mac([0x52, 0x54, 0, 0, 0, 1]),
            },
            "a",
        ),
        (
            PortKind::Vm {
                vm: "v2".into(),
                nic: 0,
                mac: Mac([0x52, 0x54, 0, 0, 0, 2]),
            },
            "b",
        ),
        (PortKind::Uplink, "t"),
        (PortKind::Host, "a"),
    ]
    .into_iter()
    .enumerate()
    {
        let Ok(p) = sw.add_port(&format!("p{i}"), kind, group) else {
            return;
        };
        sw.port_up(p.0);
        if i == 1 {
            p.1.set_accepts(OFFLOADS);
        }
        ports.push((p, group));
    }
    let mut rest = data;
    while rest.len() >= 3 {
        let from = (rest[0] & 0x7f) as usize % ports.len();
        let with_header = rest[0] & 0x80 != 0;
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let f = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let port = ports[from].0 .0;
        match with_header.then(|| VnetHdr::parse(f)).flatten() {
            Some(h) => {
                let f = &f[offload::VNET_HDR_FIELDS..];
                if let Ok(off) = offload::from_tx(&h, f, ALL_TX) {
                    sw.ingress_offloaded(port, f, off);
                }
            }
            None => sw.ingress(port, f),
        }
        if rest.first() == Some(&0xff) {
            sw.age();
        }
    }
    for ((_, q, _), group) in &ports {
        while let Some(out) = q.pop() {
            assert!(
                q.accepts().accepts(&out.offload),
                "offload work queued for a port that cannot take it"
            );
            let out = out.frame;
            assert!(
                out.len() <= offload::MAX_GSO_FRAME + 4,
                "oversize frame left a port"
            );
            if !q.accepts().any() {
                assert!(out.len() <= MAX_FRAME + 4, "oversize frame left a port");
            }
            let info = frame::parse(&out).expect("a frame that left parses");
            match *group {
                "t" => assert!(
                    matches!(info.vid, None | Some(10) | Some(20)),
                    "trunk emitted VLAN {:?}",
                    info.vid
                ),
                _ => assert!(info.vid.is_none(), "access port emitted a tag"),
            }
        }
    }
    let _: Arc<Switch> = sw;
}

/// A virtio-net header (10 bytes) and a frame, as a guest that negotiated
/// every offload might transmit them. Whatever the header asks for is
/// either refused or turns into frames that fit on a wire and carry
/// exactly the packet's payload.
pub fn offload_packet(data: &[u8]) {
    let Some(h) = VnetHdr::parse(data) else {
        return;
    };
    let f = &data[offload::VNET_HDR_FIELDS..];
    let Ok(off) = offload::from_tx(&h, f, ALL_TX) else {
        return;
    };
    let mut out = Vec::new();
    offload::finish(f.to_vec(), &off, &mut out).expect("a validated packet finishes");
    assert!(!out.is_empty() && out.len() <= offload::MAX_SEGMENTS);
    match off.gso {
        None => assert_eq!(out.len(), 1),
        Some(_) => {
            let hl = usize::from(offload::rx_header(f, &off).hdr_len);
            assert!(hl > 0, "a segmentation packet has headers");
            let payload: usize = out.iter().map(|s| s.len() - hl).sum();
            assert_eq!(payload, f.len() - hl, "payload lost or invented");
            for s in &out {
                assert!(s.len() <= MAX_FRAME, "segment of {} bytes", s.len());
                assert_eq!(s[..hl].len(), hl);
            }
        }
    }
}

/// Bytes from the wire as an LLDPDU, on their own and behind an LLDP
/// frame's header, through the parser and an uplink's neighbour table.
/// Whatever parses keeps bounded, printable text, is what the table
/// records, and reads back the same once written out again (when it can
/// be: text whose invalid bytes were replaced may have outgrown 255
/// bytes, and a MAC or address of the wrong length stays bytes under a
/// subtype the encoder gives a type).
pub fn lldp_frames(data: &[u8]) {
    let pdu = lldp::parse_pdu(data);
    let mut f = lldp::NEAREST_BRIDGE.0.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&lldp::ETHERTYPE_LLDP.to_be_bytes());
    f.extend_from_slice(data);
    assert!(lldp::is_lldp(&f));
    assert_eq!(lldp::parse_frame(&f), pdu, "the header changes nothing");
    // The same bytes as a whole frame, as an uplink might receive them.
    if lldp::is_lldp(data) {
        let _ = lldp::parse_frame(data);
    } else {
        assert_eq!(lldp::parse_frame(data), Err(lldp::LldpError::NotLldp));
    }
    if let Ok(n) = &pdu {
        for t in [&n.system_name, &n.port_description].into_iter().flatten() {
            assert!(!t.is_empty() && t.chars().count() <= lldp::MAX_TEXT);
            assert!(!t.chars().any(char::is_control), "{t:?}");
        }
        for id in [&n.chassis_id, &n.port_id] {
            let shown = id.to_string();
            assert!(!shown.chars().any(char::is_control), "{shown:?}");
            assert!(shown.len() <= 3 * lldp::MAX_TEXT + 16, "{shown:?}");
        }
        if let Ok(again) = lldp::encode_pdu(n) {
            assert_eq!(lldp::parse_pdu(&again).as_ref(), Ok(n));
        }
    }
    let mut table = lldp::NeighbourTable::new(&["m".into()]);
    let now = Instant::now();
    let heard = table.receive(0, &f, now);
    let seen = table.snapshot("u", now).remove(0);
    assert_eq!(seen.lldp_frames, 1);
    match (&pdu, heard) {
        (Ok(n), Heard::New(h)) => {
            assert!(n.ttl_s > 0);
            assert_eq!(&h, n);
            assert_eq!(seen.neighbour.as_ref(), Some(n));
        }
        (Ok(n), Heard::Withdrawn(None)) => {
            assert_eq!(n.ttl_s, 0);
            assert_eq!(seen.neighbour, None);
        }
        (Err(_), Heard::Invalid(_)) => {
            assert_eq!(seen.lldp_errors, 1);
            assert_eq!(seen.neighbour, None);
        }
        (p, h) => panic!("parsed {p:?}, the table heard {h:?}"),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn ingress_never_panics_or_leaks_vlans(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            super::ingress_frames(&data);
        }

        #[test]
        fn lldp_from_the_wire_is_refused_or_bounded(data in proptest::collection::vec(any::<u8>(), 0..1600)) {
            super::lldp_frames(&data);
        }

        /// Valid LLDPDUs with bytes overwritten, so the random test is not
        /// only exercising the first TLV's refusal.
        #[test]
        fn lldp_damaged_in_places(
            name in "[a-z0-9.-]{1,40}",
            ttl in any::<u16>(),
            hits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        ) {
            use crate::lldp::{LldpId, LldpNeighbour};
            let n = LldpNeighbour {
                chassis_id: LldpId::Mac(crate::frame::Mac([2, 0, 0, 0, 0, 9])),
                port_id: LldpId::Local(name.clone()),
                system_name: Some(name),
                port_description: None,
                ttl_s: ttl,
            };
            let mut pdu = crate::lldp::encode_pdu(&n).unwrap();
            super::lldp_frames(&pdu);
            for (at, b) in hits {
                let i = at.index(pdu.len());
                pdu[i] = b;
            }
            super::lldp_frames(&pdu);
        }

        #[test]
        fn offload_requests_are_refused_or_kept_whole(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            super::offload_packet(&data);
        }
    }

    #[test]
    fn structured_frames_pass_the_checks() {
        // Valid tagged and untagged frames from each port, so the random
        // test is not only exercising the malformed path.
        let mut data = Vec::new();
        for port in 0u8..4 {
            for vid in [None, Some(10u16), Some(20), Some(30)] {
                let mut f = vec![0xff; 6];
                f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, port + 1]);
                if let Some(v) = vid {
                    f.extend_from_slice(&[0x81, 0]);
                    f.extend_from_slice(&v.to_be_bytes());
                }
                f.extend_from_slice(&[8, 0]);
                f.resize(64, 0);
                data.push(port);
                data.extend_from_slice(&(f.len() as u16).to_le_bytes());
                data.extend_from_slice(&f);
            }
        }
        super::ingress_frames(&data);
    }
}
