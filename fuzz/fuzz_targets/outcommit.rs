//! Arbitrary frames through output commit's parser and TCP ack clamping:
//! no panic, offsets inside the frame, and a rewrite that changes only the
//! ack, window and checksum bytes and keeps a valid checksum valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_outcommit::packet::{self, PacketMeta};
use tandem_outcommit::tcp;

fuzz_target!(|data: &[u8]| {
    // The first six bytes choose the ack and window to write; the rest is
    // the frame, so every frame the parser accepts also gets rewritten.
    let Some((head, frame)) = data.split_first_chunk::<6>() else {
        return;
    };
    let ack = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let window = u16::from_be_bytes([head[4], head[5]]);
    let Some(meta) = packet::parse(frame) else {
        return;
    };
    assert!(meta.payload_offset + meta.payload_len <= frame.len());
    if meta.l4.and_then(|l4| l4.tcp).is_none() {
        return;
    }
    check_rewrite(frame, &meta, ack, window);
    // Random bytes rarely carry a valid checksum; give the same segment a
    // correct one so the "stays valid" property is exercised every time.
    let mut fixed = frame.to_vec();
    if tcp::fill_tcp_checksum(&mut fixed, &meta) {
        assert!(tcp::tcp_checksum_valid(&fixed, &meta));
        check_rewrite(&fixed, &meta, ack, window);
    }
});

fn check_rewrite(frame: &[u8], meta: &PacketMeta, ack: u32, window: u16) {
    let l4 = meta.l4.expect("TCP checked by the caller");
    let orig = l4.tcp.expect("TCP checked by the caller");
    assert!(l4.offset + orig.header_len <= frame.len());

    let valid_before = tcp::tcp_checksum_valid(frame, meta);
    let mut out = frame.to_vec();
    assert!(tcp::rewrite_ack(&mut out, meta, ack, window));
    assert_eq!(out.len(), frame.len());
    if valid_before {
        assert!(tcp::tcp_checksum_valid(&out, meta));
    }
    // Only the ack (8..12), window (14..16) and checksum (16..18) bytes of
    // the TCP header may differ.
    for (i, (a, b)) in frame.iter().zip(&out).enumerate() {
        if a != b {
            let rel = i.wrapping_sub(l4.offset);
            assert!(matches!(rel, 8..=11 | 14..=17), "byte {i} changed");
        }
    }
    let again = packet::parse(&out).expect("same length, same headers");
    let t = again.l4.and_then(|l4| l4.tcp).expect("still TCP");
    assert_eq!((t.ack, t.window), (ack, window));

    // Writing the original values back restores the frame exactly, valid
    // checksum or not, except a checksum field of 0xFFFF: the arithmetic
    // normalises that to its one's-complement twin 0x0000.
    let checksum_at = l4.offset + 16;
    if frame[checksum_at..checksum_at + 2] != [0xff, 0xff] {
        assert!(tcp::rewrite_ack(&mut out, meta, orig.ack, orig.window));
        assert_eq!(out, frame);
    }
}
