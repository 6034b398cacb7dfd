//! The replication wire format is a contract between hosts that may run
//! different tandem builds during an upgrade: an epoch recorded from the
//! first release's encoder must encode byte for byte the same today, and
//! decode to the same epoch.

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

#[test]
fn an_epoch_encodes_as_recorded_in_v1() {
    assert_eq!(encode_now(), recorded());
}

#[tokio::test]
async fn a_recorded_v1_epoch_decodes_whole() {
    let bytes = recorded();
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

/// Writes the fixture (run once, by hand, from the release being recorded).
#[test]
#[ignore]
fn record_fixture() {
    let hex: String = encode_now().iter().map(|b| format!("{b:02x}")).collect();
    let lines: Vec<&str> = hex
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/epoch-v1.hex"),
        lines.join("\n") + "\n",
    )
    .unwrap();
}
