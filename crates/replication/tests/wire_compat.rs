//! The replication wire format is a contract between hosts that may run
//! different tandem builds during an upgrade. Version 2 changed the hello
//! (VM identity), not the layout: an epoch recorded from version 1's
//! encoder differs from today's only in each header's version field (and
//! so its header checksum), and a version-1 stream is refused with both
//! versions named.

use tandem_replication::assembler::{EpochAssembler, EpochBuilder};
use tandem_replication::disklog;
use tandem_replication::wire::{self, PAGE_SIZE};

const RAM: u64 = 8 * PAGE_SIZE as u64;

/// Epoch 7 of an 8-page guest: pages 1 and 6 dirty, a small device state,
/// one disk with a data write and a zero run.
fn recorded_inputs() -> (Vec<u64>, Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
    let dirty = vec![1, 6];
    let pages: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
    let device_state = b"QEVM\x00\x00\x00\x03device-state".to_vec();
    let mut log = Vec::new();
    disklog::push(&mut log, 4096, b"fsync'd record 42\n");
    disklog::push_zero(&mut log, 65536, 8192);
    (dirty, pages, device_state, vec![log])
}

fn encode_now() -> Vec<u8> {
    let (dirty, pages, state, disks) = recorded_inputs();
    EpochBuilder::build(RAM, 7, &dirty, &pages, &state, &disks)
        .iter()
        .flat_map(|f| f.encode())
        .collect()
}

fn recorded() -> Vec<u8> {
    let hex = include_str!("fixtures/epoch-v1.hex");
    let hex: String = hex.split_whitespace().collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The recorded stream with every header relabelled as `version` (the
/// header checksum recomputed).
fn relabelled(mut bytes: Vec<u8>, version: u16) -> Vec<u8> {
    let mut at = 0;
    while at < bytes.len() {
        bytes[at + 4..at + 6].copy_from_slice(&version.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[at..at + 28]);
        bytes[at + 28..at + 32].copy_from_slice(&crc.to_le_bytes());
        let len = u32::from_le_bytes(bytes[at + 20..at + 24].try_into().unwrap()) as usize;
        at += wire::HEADER_LEN + len;
    }
    bytes
}

#[test]
fn an_epoch_is_laid_out_as_in_v1() {
    let v1 = recorded();
    assert_eq!(
        u16::from_le_bytes([v1[4], v1[5]]),
        1,
        "the fixture is version 1"
    );
    assert_eq!(encode_now(), relabelled(v1, wire::VERSION));
}

#[tokio::test]
async fn a_v1_stream_is_refused_naming_both_versions() {
    let bytes = recorded();
    let mut rd = &bytes[..];
    let err = wire::read_frame(&mut rd).await.expect_err("refused");
    let why = err.to_string();
    assert!(
        why.contains("version 1") && why.contains(&format!("version {}", wire::VERSION)),
        "{why}"
    );
}

#[tokio::test]
async fn the_recorded_epoch_decodes_whole() {
    let bytes = relabelled(recorded(), wire::VERSION);
    let mut rd = &bytes[..];
    let mut asm = EpochAssembler::new(7, RAM);
    let mut done = None;
    while let Some(f) = wire::read_frame(&mut rd).await.expect("valid frames") {
        if let Some(e) = asm.push(f).expect("a valid epoch") {
            done = Some(e);
        }
    }
    let e = done.expect("the epoch completes");
    let (dirty, pages, state, disks) = recorded_inputs();
    assert_eq!(e.epoch, 7);
    assert_eq!(e.pages, dirty);
    assert_eq!(e.page_data, pages);
    assert_eq!(e.device_state, state);
    assert_eq!(e.disk_writes, disks);
}
