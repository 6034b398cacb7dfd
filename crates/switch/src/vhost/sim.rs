//! A driver-side model of one split virtqueue ([`SimRing`]) and the fuzz
//! entry points of the TX and RX paths built on it. Test and fuzz code
//! only: compiled with `cfg(test)`, `cfg(fuzzing)` (cargo-fuzz) or the
//! `fault-injection` feature.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::ring::{process_rx, process_tx, rx_offloads, tx_offloads, NetPath};
use super::{LEGACY_NET_HDR_LEN, NET_HDR_LEN, OFFERED_FEATURES};
use crate::offload::{self, Offload};
use crate::port::{EgressQueue, Ingress, Packet, PortCounters, PortId, MAX_FRAME, MIN_FRAME};

/// Guest memory holding one split virtqueue, written from the driver's
/// side. Used by the unit tests and the fuzz entry points.
#[doc(hidden)]
pub struct SimRing {
    pub mem: GuestMemoryMmap<()>,
    pub queue: Queue,
    size: u16,
    avail_idx: u16,
}

#[doc(hidden)]
impl SimRing {
    pub const MEM_SIZE: u64 = 0x10000;
    pub const DESC: u64 = 0x0;
    pub const AVAIL: u64 = 0x1000;
    pub const USED: u64 = 0x2000;
    /// First byte past the rings, where buffers go.
    pub const BUF: u64 = 0x3000;

    /// A ready queue of `size` (a power of two, at most 256) entries.
    pub fn new(size: u16) -> Option<Self> {
        if size == 0 || size > 256 || !size.is_power_of_two() {
            return None;
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), Self::MEM_SIZE as usize)])
            .ok()?;
        let mut queue = Queue::new(size).ok()?;
        queue
            .try_set_desc_table_address(GuestAddress(Self::DESC))
            .ok()?;
        queue
            .try_set_avail_ring_address(GuestAddress(Self::AVAIL))
            .ok()?;
        queue
            .try_set_used_ring_address(GuestAddress(Self::USED))
            .ok()?;
        queue.set_ready(true);
        Some(Self {
            mem,
            queue,
            size,
            avail_idx: 0,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        let _ = self
            .mem
            .write_slice(&raw, GuestAddress(Self::DESC + 16 * u64::from(index)));
    }

    /// Makes `head` available and publishes the new avail index.
    pub fn offer(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        let _ = self
            .mem
            .write_obj(head.to_le(), GuestAddress(Self::AVAIL + 4 + 2 * slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the avail index as is (hostile guests write anything).
    pub fn set_avail_idx(&self, idx: u16) {
        let _ = self
            .mem
            .write_obj(idx.to_le(), GuestAddress(Self::AVAIL + 2));
    }

    pub fn set_avail_flags(&self, flags: u16) {
        let _ = self.mem.write_obj(flags.to_le(), GuestAddress(Self::AVAIL));
    }

    /// `used_event`, in the avail ring (EVENT_IDX).
    pub fn set_used_event(&self, idx: u16) {
        let at = Self::AVAIL + 4 + 2 * u64::from(self.size);
        let _ = self.mem.write_obj(idx.to_le(), GuestAddress(at));
    }

    /// `avail_event`, in the used ring (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let at = Self::USED + 4 + 8 * u64::from(self.size);
        u16::from_le(self.mem.read_obj(GuestAddress(at)).unwrap_or(0))
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(Self::USED + 2)).unwrap_or(0))
    }

    /// The used entries published so far (at most one ring's worth).
    pub fn used(&self) -> Vec<(u32, u32)> {
        let n = self.used_idx().min(self.size);
        (0..n)
            .map(|i| {
                let at = GuestAddress(Self::USED + 4 + 8 * u64::from(i));
                let mut e = [0u8; 8];
                let _ = self.mem.read_slice(&mut e, at);
                let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                (id, len)
            })
            .collect()
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        let _ = self.mem.write_slice(bytes, GuestAddress(addr));
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let _ = self.mem.read_slice(&mut v, GuestAddress(addr));
        v
    }
}

/// Reads fuzz input; yields zeros once it runs out.
struct FuzzInput<'a>(&'a [u8]);

impl FuzzInput<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// Builds a ring from fuzz input: size, descriptor table, offered heads,
/// buffer contents. Returns the ring and the header length to use.
fn fuzz_ring(input: &mut FuzzInput<'_>) -> Option<(SimRing, usize, bool, u64)> {
    let mode = input.u8();
    let size = 1u16 << (mode % 9);
    let mut ring = SimRing::new(size)?;
    ring.queue.set_event_idx(mode & 0x10 != 0);
    let hdr_len = if mode & 0x20 != 0 {
        LEGACY_NET_HDR_LEN
    } else {
        NET_HDR_LEN
    };
    let mrg = mode & 0x40 != 0;
    let features = if mode & 0x80 != 0 {
        OFFERED_FEATURES
    } else {
        0
    };
    for i in 0..size {
        let kind = input.u8();
        // Mostly addresses that land in (or just past) guest memory, so
        // the interesting paths run; sometimes anything at all.
        let addr = if kind & 1 == 0 {
            SimRing::BUF + u64::from(input.u32()) % (SimRing::MEM_SIZE - SimRing::BUF + 0x200)
        } else {
            input.u64()
        };
        let len = if kind & 2 == 0 {
            u32::from(input.u16() % 2048)
        } else {
            input.u32()
        };
        let flags = input.u16() & 0x7;
        let next = if kind & 4 == 0 {
            input.u16() % (size + 2)
        } else {
            input.u16()
        };
        ring.set_desc(i, addr, len, flags, next);
    }
    let heads = input.u8() % 64;
    for _ in 0..heads {
        let h = input.u16() % (size + 2);
        ring.offer(h);
    }
    let tweak = input.u8();
    if tweak & 1 != 0 {
        ring.set_avail_idx(input.u16());
    }
    if tweak & 2 != 0 {
        ring.set_used_event(input.u16());
    }
    ring.set_avail_flags(u16::from(tweak >> 7));
    let fill = input
        .0
        .len()
        .min((SimRing::MEM_SIZE - SimRing::BUF) as usize);
    ring.write(SimRing::BUF, &input.0[..fill]);
    Some((ring, hdr_len, mrg, features))
}

struct CheckingIngress;

impl Ingress for CheckingIngress {
    fn ingress(&self, _port: PortId, frame: &[u8]) {
        assert!(
            (MIN_FRAME..=MAX_FRAME).contains(&frame.len()),
            "delivered a frame of {} bytes",
            frame.len()
        );
    }

    fn ingress_offloaded(&self, _port: PortId, frame: &[u8], off: Offload) {
        assert!(
            !off.is_none() && frame.len() <= off.max_frame(),
            "offloaded packet of {} bytes",
            frame.len()
        );
        let mut plain = Vec::new();
        offload::finish(frame.to_vec(), &off, &mut plain).expect("validated offload finishes");
        for f in plain {
            self.ingress(0, &f);
        }
    }
}

/// Fuzz entry point for the TX path: builds guest memory and a virtqueue
/// from arbitrary bytes and runs [`process_tx`] on it. Must never panic.
pub fn fuzz_tx_chain(data: &[u8]) {
    let mut input = FuzzInput(data);
    let Some((mut ring, hdr_len, mrg, features)) = fuzz_ring(&mut input) else {
        return;
    };
    let counters = PortCounters::default();
    let path = NetPath {
        port: 0,
        hdr_len,
        mrg_rxbuf: mrg,
        tx_offloads: tx_offloads(features),
        rx_offloads: rx_offloads(features),
        counters: &counters,
        writes: None,
    };
    let size = ring.size();
    let res = process_tx(&ring.mem, &mut ring.queue, &path, &CheckingIngress);
    if res.is_ok() {
        assert!(ring
            .used()
            .iter()
            .all(|&(id, len)| id < u32::from(size) && len == 0));
    }
}

/// Fuzz entry point for the RX path: like [`fuzz_tx_chain`], with frames
/// waiting to be written into the hostile ring. Must never panic.
pub fn fuzz_rx_chain(data: &[u8]) {
    let mut input = FuzzInput(data);
    let Some((mut ring, hdr_len, mrg, features)) = fuzz_ring(&mut input) else {
        return;
    };
    let Ok(egress) = EgressQueue::new(8, 8 * MAX_FRAME) else {
        return;
    };
    for i in 0..4u8 {
        let len = 10 + (usize::from(i) * 517) % (MAX_FRAME + 4);
        egress.push(vec![i; len]);
    }
    // A packet with a checksum left to finish: delivered whole to a guest
    // that takes offloads, finished first for one that does not.
    egress.push_packet(Packet {
        frame: vec![0x45; 200],
        offload: Offload {
            csum: Some(offload::PartialCsum {
                start: 20,
                offset: 16,
            }),
            gso: None,
        },
    });
    let counters = PortCounters::default();
    let path = NetPath {
        port: 0,
        hdr_len,
        mrg_rxbuf: mrg,
        tx_offloads: tx_offloads(features),
        rx_offloads: rx_offloads(features),
        counters: &counters,
        writes: None,
    };
    let size = ring.size();
    let res = process_rx(&ring.mem, &mut ring.queue, &path, &egress);
    if res.is_ok() {
        assert!(ring
            .used()
            .iter()
            .all(|&(id, len)| id < u32::from(size) && len as usize <= hdr_len + MAX_FRAME));
    }
}

/// A guest that keeps transmitting: each frame the device takes makes it
/// post that chain again at once, until it has posted `total` in all.
#[cfg(test)]
pub(super) struct BusyGuest {
    mem: GuestMemoryMmap<()>,
    size: u16,
    total: u16,
    posted: std::sync::Mutex<u16>,
    frames: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl SimRing {
    /// Posts the chains with heads `0..size` (at most `total` of them) on a
    /// fresh ring and returns the guest that keeps posting them, round
    /// robin, as the device takes them. Each head must be a whole TX chain.
    pub(super) fn busy_guest(&mut self, total: u16) -> BusyGuest {
        assert_eq!(self.avail_idx, 0, "a fresh ring");
        for head in 0..self.size.min(total) {
            self.offer(head);
        }
        BusyGuest {
            mem: self.mem.clone(),
            size: self.size,
            total,
            posted: std::sync::Mutex::new(self.avail_idx),
            frames: Default::default(),
        }
    }
}

#[cfg(test)]
impl BusyGuest {
    /// Frames the device has taken so far.
    pub(super) fn frames(&self) -> usize {
        self.frames.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[cfg(test)]
impl Ingress for BusyGuest {
    fn ingress(&self, _port: PortId, _frame: &[u8]) {
        self.frames
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let mut posted = super::lock(&self.posted);
        if *posted < self.total {
            // Heads were posted in order from 0, so the chain just taken
            // is the one at this slot.
            let slot = *posted % self.size;
            let at = SimRing::AVAIL + 4 + 2 * u64::from(slot);
            let _ = self.mem.write_obj(slot.to_le(), GuestAddress(at));
            *posted += 1;
            let _ = self
                .mem
                .write_obj(posted.to_le(), GuestAddress(SimRing::AVAIL + 2));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fuzz_tx_never_panics(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            super::fuzz_tx_chain(&data);
        }

        #[test]
        fn fuzz_rx_never_panics(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            super::fuzz_rx_chain(&data);
        }
    }
}
