//! Entry point for the `replication_stream` fuzz target in `fuzz/` (and the
//! property test that runs the same code on stable in every test run):
//! everything the backup and primary parse from the replication link.

use crate::assembler::{CompleteEpoch, EpochAssembler, EpochBuilder};
use crate::disklog;
use crate::wire::{
    self, DigestCollector, EpochBegin, EpochEnd, Frame, FrameKind, Hello, ReplicaDigest,
    HEADER_LEN, PAGE_SIZE,
};

const PAGES: u64 = 16;
const RAM: u64 = PAGES * PAGE_SIZE as u64;
const DISK: u64 = 1 << 20;

/// Three passes over `data`:
/// 1. as raw bytes off a socket, through the frame decoder and every
///    payload parser;
/// 2. as a script of well-framed frames with arbitrary kinds, sequence
///    numbers and payloads, into the backup's epoch assembler: whatever it
///    accepts stays inside the replica's RAM and disk;
/// 3. as a valid epoch (pages, device state, disk writes drawn from the
///    data) with one payload byte flipped: the assembler must reject it,
///    never accept a different epoch.
pub fn replication_stream(data: &[u8]) {
    let mut buf = data;
    while let Ok(Some((f, used))) = wire::decode(buf) {
        assert!((HEADER_LEN..=buf.len()).contains(&used));
        buf = &buf[used..];
        payloads(&f);
    }

    let mut asm = EpochAssembler::new(1, RAM).with_disk_limit(DISK);
    let mut rest = data;
    while rest.len() >= 4 {
        let kind = FrameKind::from_u16(1 + u16::from(rest[0] % 12)).unwrap_or(FrameKind::Pages);
        let seq = u32::from(rest[1] % 8);
        let len = (usize::from(rest[2]) | usize::from(rest[3]) << 8).min(rest.len() - 4);
        let f = Frame::new(kind, 1, seq, rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
        payloads(&f);
        match asm.push(f) {
            Ok(Some(e)) => {
                inside_the_replica(&e);
                asm = EpochAssembler::new(1, RAM).with_disk_limit(DISK);
            }
            Ok(None) => {}
            Err(_) => asm = EpochAssembler::new(1, RAM).with_disk_limit(DISK),
        }
    }

    flipped_epoch(data);
}

fn payloads(f: &Frame) {
    match f.kind {
        FrameKind::Hello => {
            let _ = serde_json::from_slice::<Hello>(&f.payload);
        }
        FrameKind::EpochBegin => {
            let _ = EpochBegin::decode(&f.payload);
        }
        FrameKind::EpochEnd => {
            let _ = EpochEnd::decode(&f.payload);
        }
        FrameKind::Pages => {
            if let Ok(records) = wire::page_records(&f.payload) {
                for (_, page) in records {
                    assert_eq!(page.len(), PAGE_SIZE);
                }
            }
        }
        FrameKind::DiskWrites => {
            for r in disklog::parse(&f.payload, DISK).unwrap_or_default() {
                inside_the_disk(&r);
            }
        }
        FrameKind::ReplicaDigest => {
            if let Ok(d) = ReplicaDigest::decode(&f.payload) {
                let n = d.hashes.len() as u64;
                assert!(d.first + n <= d.total);
                let _ = DigestCollector::default().push(d);
            }
        }
        _ => {}
    }
}

fn inside_the_disk(r: &disklog::Record<'_>) {
    match r {
        disklog::Record::Data(off, data) => assert!(off + data.len() as u64 <= DISK),
        disklog::Record::Zero(off, len) => assert!(off + len <= DISK),
    }
}

fn inside_the_replica(e: &CompleteEpoch) {
    assert_eq!(e.page_data.len(), e.pages.len() * PAGE_SIZE);
    assert!(e.pages.iter().all(|&p| p < PAGES), "a page outside RAM");
    for log in &e.disk_writes {
        for r in disklog::parse(log, DISK).unwrap_or_default() {
            inside_the_disk(&r);
        }
    }
}

fn flipped_epoch(data: &[u8]) {
    let Some((&[pick, at_lo, at_hi, flip], body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let pages: Vec<u64> = body
        .iter()
        .take(8)
        .map(|b| u64::from(b % PAGES as u8))
        .collect();
    let mut pages_dedup = pages.clone();
    pages_dedup.sort_unstable();
    pages_dedup.dedup();
    let page_data: Vec<u8> = pages_dedup
        .iter()
        .flat_map(|&p| std::iter::repeat_n(p as u8 ^ 0x5a, PAGE_SIZE))
        .collect();
    let state = body.get(8..24).unwrap_or_default();
    let mut log = Vec::new();
    for (i, b) in body.iter().skip(24).take(4).enumerate() {
        disklog::push(&mut log, (i as u64) * 512, &[*b; 512]);
    }
    let frames = EpochBuilder::build(RAM, 1, &pages_dedup, &page_data, state, &[log.clone()]);
    let mut frames_flipped = frames.clone();
    let i = usize::from(pick) % frames_flipped.len();
    let f = &mut frames_flipped[i];
    if f.payload.is_empty() || flip == 0 {
        return;
    }
    let at = (usize::from(at_lo) | usize::from(at_hi) << 8) % f.payload.len();
    f.payload[at] ^= flip;
    let mut asm = EpochAssembler::new(1, RAM).with_disk_limit(DISK);
    for f in frames_flipped {
        match asm.push(f) {
            Ok(Some(e)) => panic!(
                "a corrupt epoch was accepted: pages {:?} (sent {pages_dedup:?})",
                e.pages
            ),
            Ok(None) => {}
            Err(_) => return,
        }
    }
    // Not rejected, not completed: the epoch is still waiting for frames,
    // which is a rejection as far as applying goes.
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn replication_stream_holds_on_any_input(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            replication_stream(&data);
        }
    }

    #[test]
    fn an_unflipped_epoch_is_accepted() {
        // The property above only means something if an intact epoch
        // passes the same assembler.
        let frames = EpochBuilder::build(RAM, 1, &[3], &[7u8; PAGE_SIZE], b"state", &[Vec::new()]);
        let mut asm = EpochAssembler::new(1, RAM).with_disk_limit(DISK);
        let mut done = None;
        for f in frames {
            done = asm.push(f).unwrap();
        }
        assert_eq!(done.expect("complete").pages, [3]);
    }
}
