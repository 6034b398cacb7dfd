//! Ring access: the virtio-net data path on split virtqueues. The header
//! and chain rules are pure functions; TX and RX processing are generic
//! over the guest memory so tests and fuzzers can run them on a plain
//! `GuestMemoryMmap`.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::{LEGACY_NET_HDR_LEN, MAX_CHAIN_DESCRIPTORS, NET_HDR_LEN};
use crate::offload::{self, Offload, RxOffloads, TxOffloads, VnetHdr, VNET_HDR_FIELDS};
use crate::port::{
    DropReason, EgressQueue, Ingress, Packet, PortCounters, PortId, MAX_FRAME, MIN_FRAME,
};
use tandem_dirty::PageLog;

/// Used-ring entries collected before they are published to the guest.
const USED_BATCH: usize = 64;
/// Rounds of "arm the kick, find new buffers, try again" per RX event.
const RX_RETRIES: usize = 8;
/// Chains one TX run takes from the guest at most (like vhost-net's
/// `VHOST_NET_WEIGHT`): a guest that keeps posting would otherwise keep
/// the port's worker in one run for as long as it likes. The rest waits
/// for the next run, which the caller must schedule itself (see
/// [`QueueRun::budget_spent`]).
pub const TX_BUDGET: usize = 256;

// ---------------------------------------------------------------------------
// Pure helpers: header layout, chain rules, event-index arithmetic.
// ---------------------------------------------------------------------------

/// Length of the virtio-net header for the negotiated `features`.
pub fn net_hdr_len(features: u64) -> usize {
    if features & ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        NET_HDR_LEN
    } else {
        LEGACY_NET_HDR_LEN
    }
}

/// Offloads a guest's transmit headers may use, from its features.
pub fn tx_offloads(features: u64) -> TxOffloads {
    let has = |bit: u32| features & (1 << bit) != 0;
    let csum = has(VIRTIO_NET_F_CSUM);
    TxOffloads {
        csum,
        // Segmentation without checksum offload is not valid virtio.
        tso4: csum && has(VIRTIO_NET_F_HOST_TSO4),
        tso6: csum && has(VIRTIO_NET_F_HOST_TSO6),
    }
}

/// Offloaded packets a guest takes on receive, from its features.
pub fn rx_offloads(features: u64) -> RxOffloads {
    let has = |bit: u32| features & (1 << bit) != 0;
    let csum = has(VIRTIO_NET_F_GUEST_CSUM);
    RxOffloads {
        csum,
        tso4: csum && has(VIRTIO_NET_F_GUEST_TSO4),
        tso6: csum && has(VIRTIO_NET_F_GUEST_TSO6),
    }
}

/// The header put in front of a received frame: the offload fields of
/// `vnet`, and `num_buffers` when the header has that field.
pub fn rx_header(hdr_len: usize, vnet: &VnetHdr, num_buffers: u16) -> ([u8; NET_HDR_LEN], usize) {
    let mut h = [0u8; NET_HDR_LEN];
    h[..VNET_HDR_FIELDS].copy_from_slice(&vnet.to_bytes());
    let len = if hdr_len >= NET_HDR_LEN {
        h[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        NET_HDR_LEN
    } else {
        LEGACY_NET_HDR_LEN
    };
    (h, len)
}

/// Strips the virtio-net header from what a guest transmitted, checks the
/// Ethernet frame's size and, when offloads were negotiated, validates what
/// the header asks for against the frame. Without offloads the header's
/// contents are ignored: there is nothing in it the device must act on.
pub fn strip_tx_header(
    buf: &[u8],
    hdr_len: usize,
    allowed: TxOffloads,
) -> Result<(&[u8], Offload), DropReason> {
    let frame = buf.get(hdr_len..).ok_or(DropReason::Malformed)?;
    let off = if allowed == TxOffloads::default() {
        Offload::NONE
    } else {
        let hdr = VnetHdr::parse(buf).ok_or(DropReason::Malformed)?;
        offload::from_tx(&hdr, frame, allowed).map_err(|_| DropReason::Malformed)?
    };
    if frame.len() < MIN_FRAME || frame.len() > off.max_frame() {
        return Err(DropReason::Malformed);
    }
    Ok((frame, off))
}

/// Validation of one descriptor chain, fed descriptor by descriptor in the
/// order the chain yields them.
///
/// Rules: at most [`MAX_CHAIN_DESCRIPTORS`] descriptors; every descriptor
/// in the direction of the queue (readable on TX, write-only on RX); the
/// chain must end with a descriptor without `NEXT` (a chain that stops
/// while still announcing a successor looped, pointed outside its table or
/// could not be read); on TX the bytes may not exceed the header plus
/// [`MAX_FRAME`] (that is a size problem: `Malformed`).
#[derive(Debug, Clone)]
pub struct ChainCheck {
    device_writes: bool,
    max_bytes: Option<usize>,
    descs: usize,
    bytes: usize,
    open: bool,
}

impl ChainCheck {
    /// Rules for a TX chain carrying a header of `hdr_len` bytes and a
    /// frame of at most `max_frame`.
    pub fn tx(hdr_len: usize, max_frame: usize) -> Self {
        Self {
            device_writes: false,
            max_bytes: Some(hdr_len + max_frame),
            descs: 0,
            bytes: 0,
            open: true,
        }
    }

    /// Rules for an RX buffer.
    pub fn rx() -> Self {
        Self {
            device_writes: true,
            max_bytes: None,
            descs: 0,
            bytes: 0,
            open: true,
        }
    }

    /// Accounts one descriptor.
    pub fn step(&mut self, write_only: bool, len: u32, has_next: bool) -> Result<(), DropReason> {
        self.descs += 1;
        if self.descs > MAX_CHAIN_DESCRIPTORS || write_only != self.device_writes {
            return Err(DropReason::BadDescriptor);
        }
        self.bytes = self.bytes.saturating_add(len as usize);
        if self.max_bytes.is_some_and(|max| self.bytes > max) {
            return Err(DropReason::Malformed);
        }
        self.open = has_next;
        Ok(())
    }

    /// Ends the chain; its total length in bytes.
    pub fn finish(&self) -> Result<usize, DropReason> {
        if self.descs == 0 || self.open {
            return Err(DropReason::BadDescriptor);
        }
        Ok(self.bytes)
    }
}

/// `vring_need_event` of the virtio spec: with `VIRTIO_RING_F_EVENT_IDX`,
/// whether moving an index from `old` to `new` crosses `event`, the value
/// at which the other side asked to be notified.
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

// ---------------------------------------------------------------------------
// Ring processing, generic over the guest memory so tests and fuzzers can
// run it on a plain `GuestMemoryMmap`.
// ---------------------------------------------------------------------------

/// The ring itself (not one chain) is unusable; the queue is given up until
/// the guest resets it.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring layout outside guest memory or not ready")]
    Layout,
    #[error("virtqueue: {0}")]
    Queue(virtio_queue::Error),
    #[error("guest memory access to the ring failed: {0}")]
    Memory(vm_memory::GuestMemoryError),
    #[error("available ring announces chains whose heads cannot be read")]
    Stalled,
}

/// What one processing run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueRun {
    /// Chains returned to the used ring.
    pub chains: usize,
    /// The guest should be interrupted (its suppression settings allow it).
    pub signal: bool,
    /// RX only: frames wait and the guest has no buffer for them.
    pub starved: bool,
    /// TX only: the port's shaping policy holds the next frame back for
    /// this long; it stays in the guest's ring until then.
    pub throttled: Option<Duration>,
    /// TX only: the run stopped after [`TX_BUDGET`] chains. More may wait
    /// and the guest's notifications stay off, so the guest will not kick
    /// for them: the caller must run the queue again soon.
    pub budget_spent: bool,
}

/// Per-port parameters of the data path, fixed for one processing run.
pub struct NetPath<'a> {
    pub port: PortId,
    /// 12 ([`NET_HDR_LEN`]) or 10 ([`LEGACY_NET_HDR_LEN`]).
    pub hdr_len: usize,
    pub mrg_rxbuf: bool,
    /// What the guest's transmit headers may ask for.
    pub tx_offloads: TxOffloads,
    /// What the guest takes on receive.
    pub rx_offloads: RxOffloads,
    pub counters: &'a PortCounters,
    /// Where writes into guest RAM are recorded, as pages of the RAM file,
    /// before they are made (replication's soft-dirty tracker cannot see
    /// writes through this process's mapping).
    pub writes: Option<&'a PageLog>,
}

impl<'a> NetPath<'a> {
    pub(super) fn for_features(
        port: PortId,
        features: u64,
        counters: &'a PortCounters,
        writes: Option<&'a PageLog>,
    ) -> NetPath<'a> {
        NetPath {
            port,
            hdr_len: net_hdr_len(features),
            mrg_rxbuf: features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            tx_offloads: tx_offloads(features),
            rx_offloads: rx_offloads(features),
            counters,
            writes,
        }
    }

    /// Records a coming write of `len` bytes at `addr`.
    fn will_write<M: GuestMemory>(&self, mem: &M, addr: GuestAddress, len: usize) {
        if let Some(log) = self.writes {
            log_write(mem, log, addr, len);
        }
    }

    /// Records that the used ring of `q` may be written (entries, index,
    /// the avail-event field).
    fn will_write_used<M: GuestMemory>(&self, mem: &M, q: &Queue) {
        if self.writes.is_some() {
            let len = 4 + 8 * usize::from(q.size()) + 2;
            self.will_write(mem, GuestAddress(q.used_ring()), len);
        }
    }
}

/// Places a write of guest memory in the RAM file behind it: the memory
/// regions QEMU hands over map that file at an offset. A write that lands
/// outside every region, or in one without a file, poisons the log.
fn log_write<M: GuestMemory>(mem: &M, log: &PageLog, addr: GuestAddress, len: usize) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    // Behind an IOMMU there is no plain physical layout to place it in.
    let Some(phys) = mem.physical_memory() else {
        log.poison();
        return;
    };
    let mut at = addr;
    let mut left = len as u64;
    // Each round covers at least one byte or stops; a write spans few
    // regions.
    while left > 0 {
        let Some(region) = phys.find_region(at) else {
            log.poison();
            return;
        };
        let Some(file) = region.file_offset() else {
            log.poison();
            return;
        };
        let within = at.0 - region.start_addr().0;
        let n = left.min(region.len() - within);
        log.mark_bytes(file.start() + within, n);
        left -= n;
        match at.checked_add(n) {
            Some(next) => at = next,
            None => {
                if left > 0 {
                    log.poison();
                }
                return;
            }
        }
    }
}

/// Pops the next available chain. `None` when the guest offered nothing
/// more; an error when the available ring is corrupt.
fn next_chain<'m, M: GuestMemory>(
    mem: &'m M,
    q: &mut Queue,
) -> Result<Option<DescriptorChain<&'m M>>, RingError> {
    // The common case costs one read of the avail index (the iterator's).
    if let Some(chain) = q.iter(mem).map_err(RingError::Queue)?.next() {
        return Ok(Some(chain));
    }
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(RingError::Queue)?;
    if avail.0 == q.next_avail() {
        return Ok(None);
    }
    // Something arrived since the iterator looked, or the entry cannot be
    // read: a fresh iterator sees everything up to `avail` at least.
    let chain = q.iter(mem).map_err(RingError::Queue)?.next();
    if chain.is_none() {
        // The index said there was something, yet the entry could not be
        // read: looping on this would spin forever.
        return Err(RingError::Stalled);
    }
    Ok(chain)
}

/// Writes used-ring entries and then publishes them with a single index
/// update, so the guest never sees part of a multi-buffer frame.
fn publish_used<M: GuestMemory>(
    mem: &M,
    q: &mut Queue,
    used: &mut Vec<(u16, u32)>,
) -> Result<(), RingError> {
    if used.is_empty() {
        return Ok(());
    }
    let size = q.size();
    let base = GuestAddress(q.used_ring());
    let mut idx = Wrapping(q.next_used());
    // Entries go out in runs of consecutive slots (one write each; a run
    // ends where the ring wraps).
    let mut run: Vec<u8> = Vec::with_capacity(used.len() * 8);
    let mut rest = &used[..];
    while !rest.is_empty() {
        let slot = idx.0 % size;
        let n = rest.len().min(usize::from(size - slot));
        run.clear();
        for &(head, len) in &rest[..n] {
            run.extend_from_slice(&u32::from(head).to_le_bytes());
            run.extend_from_slice(&len.to_le_bytes());
        }
        let addr = base
            .checked_add(4 + u64::from(slot) * 8)
            .ok_or(RingError::Queue(virtio_queue::Error::AddressOverflow))?;
        mem.write_slice(&run, addr).map_err(RingError::Memory)?;
        idx += Wrapping(n as u16);
        rest = &rest[n..];
    }
    let idx_addr = base
        .checked_add(2)
        .ok_or(RingError::Queue(virtio_queue::Error::AddressOverflow))?;
    mem.store(idx.0.to_le(), idx_addr, Ordering::Release)
        .map_err(RingError::Memory)?;
    q.set_next_used(idx.0);
    used.clear();
    Ok(())
}

/// Whether the guest wants an interrupt now that the used index moved from
/// `old` to `new` (`used_event` with EVENT_IDX, else the avail flags).
fn should_signal<M: GuestMemory>(
    mem: &M,
    q: &Queue,
    old: u16,
    new: u16,
) -> Result<bool, RingError> {
    if old == new {
        return Ok(false);
    }
    // The used entries must be visible before the guest's suppression
    // setting is read.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(q.avail_ring());
    if q.event_idx_enabled() {
        let addr = avail
            .checked_add(4 + 2 * u64::from(q.size()))
            .ok_or(RingError::Queue(virtio_queue::Error::AddressOverflow))?;
        let event: u16 = mem
            .load(addr, Ordering::Relaxed)
            .map_err(RingError::Memory)?;
        Ok(vring_need_event(u16::from_le(event), new, old))
    } else {
        let flags: u16 = mem
            .load(avail, Ordering::Relaxed)
            .map_err(RingError::Memory)?;
        Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
    }
}

/// Gathers a TX chain's bytes (header included) into `buf`.
fn read_tx_chain<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    hdr_len: usize,
    max_frame: usize,
    buf: &mut Vec<u8>,
) -> Result<(), DropReason> {
    buf.clear();
    let mut check = ChainCheck::tx(hdr_len, max_frame);
    for desc in chain {
        check.step(desc.is_write_only(), desc.len(), desc.has_next())?;
        let start = buf.len();
        // `step` bounded the total by hdr_len + max_frame.
        buf.resize(start + desc.len() as usize, 0);
        mem.read_slice(&mut buf[start..], desc.addr())
            .map_err(|_| DropReason::BadDescriptor)?;
    }
    check.finish().map(|_| ())
}

/// Runs the TX queue: every available chain (at most [`TX_BUDGET`]) is
/// read, its frame handed to `ingress`, and the chain returned to the
/// guest.
pub fn process_tx<M: GuestMemory>(
    mem: &M,
    q: &mut Queue,
    path: &NetPath<'_>,
    ingress: &dyn Ingress,
) -> Result<QueueRun, RingError> {
    if !q.is_valid(mem) {
        return Err(RingError::Layout);
    }
    path.will_write_used(mem, q);
    let mut run = QueueRun::default();
    let old_used = q.next_used();
    let max_frame = if path.tx_offloads.tso4 || path.tx_offloads.tso6 {
        offload::MAX_GSO_FRAME
    } else {
        MAX_FRAME
    };
    let mut buf = Vec::with_capacity(path.hdr_len + MAX_FRAME);
    let mut used = Vec::with_capacity(USED_BATCH);
    let mut taken = 0usize;
    'ring: loop {
        q.disable_notification(mem).map_err(RingError::Queue)?;
        // One clock read per batch: shaping needs no finer time.
        let now = Instant::now();
        while let Some(chain) = next_chain(mem, q)? {
            taken += 1;
            let head = chain.head_index();
            match read_tx_chain(mem, chain, path.hdr_len, max_frame, &mut buf)
                .and_then(|()| strip_tx_header(&buf, path.hdr_len, path.tx_offloads))
            {
                Ok((frame, off)) => {
                    if let Err(wait) = ingress.reserve_tx(path.port, frame.len(), now) {
                        // Shaping: put the chain back and leave the guest's
                        // notifications off; the port's timer serves the
                        // ring again when the policy allows.
                        q.set_next_avail(q.next_avail().wrapping_sub(1));
                        run.throttled = Some(wait);
                        break 'ring;
                    }
                    path.counters.received(frame.len());
                    if off.is_none() {
                        ingress.ingress(path.port, frame);
                    } else {
                        ingress.ingress_offloaded(path.port, frame, off);
                    }
                }
                Err(why) => path.counters.dropped(why),
            }
            // A head outside the table names no chain: nothing to return.
            if head < q.size() {
                used.push((head, 0));
                run.chains += 1;
            }
            if used.len() >= USED_BATCH {
                publish_used(mem, q, &mut used)?;
            }
            if taken >= TX_BUDGET {
                // Notifications stay off: the caller comes back for the
                // rest, so the guest need not kick.
                run.budget_spent = true;
                break 'ring;
            }
        }
        publish_used(mem, q, &mut used)?;
        if !q.enable_notification(mem).map_err(RingError::Queue)? {
            break;
        }
    }
    publish_used(mem, q, &mut used)?;
    run.signal = should_signal(mem, q, old_used, q.next_used())?;
    Ok(run)
}

/// A validated RX buffer: its write-only segments.
struct RxBuffer {
    head: u16,
    segs: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

fn read_rx_chain<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    hdr_len: usize,
) -> Result<RxBuffer, DropReason> {
    let head = chain.head_index();
    let mut check = ChainCheck::rx();
    let mut segs = Vec::new();
    for desc in chain {
        check.step(desc.is_write_only(), desc.len(), desc.has_next())?;
        let len = desc.len() as usize;
        if len > 0 {
            if !mem.check_range(desc.addr(), len, Permissions::Write) {
                return Err(DropReason::BadDescriptor);
            }
            segs.push((desc.addr(), len));
        }
    }
    let capacity = check.finish()?;
    // Every buffer must at least hold the header (virtio 1.2, 5.1.6.3.1).
    if capacity < hdr_len {
        return Err(DropReason::BadDescriptor);
    }
    Ok(RxBuffer {
        head,
        segs,
        capacity,
    })
}

enum Placement {
    Delivered,
    Dropped(DropReason),
    /// Not enough buffers; the ring was rewound. `exhausted_at` is the
    /// avail index at which the guest's buffers ran out.
    NoBuffers {
        exhausted_at: u16,
    },
}

/// Puts one frame into the guest's buffers, or decides it cannot be.
fn place_frame<M: GuestMemory>(
    mem: &M,
    q: &mut Queue,
    path: &NetPath<'_>,
    frame: &[u8],
    vnet: &VnetHdr,
    used: &mut Vec<(u16, u32)>,
) -> Result<Placement, RingError> {
    let needed = path.hdr_len + frame.len();
    let max_buffers = if path.mrg_rxbuf {
        usize::from(q.size())
    } else {
        1
    };
    let mut held: Vec<RxBuffer> = Vec::new();
    let mut have = 0usize;
    // Where this frame's buffers start: the ring is rewound to here when
    // the guest has not posted enough of them yet.
    let mut start = q.next_avail();
    while have < needed {
        if held.len() >= max_buffers {
            used.extend(held.iter().map(|b| (b.head, 0)));
            return Ok(Placement::Dropped(DropReason::NoBuffer));
        }
        let Some(chain) = next_chain(mem, q)? else {
            let exhausted_at = q.next_avail();
            q.set_next_avail(start);
            return Ok(Placement::NoBuffers { exhausted_at });
        };
        let head = chain.head_index();
        match read_rx_chain(mem, chain, path.hdr_len) {
            Ok(b) => {
                have = have.saturating_add(b.capacity);
                held.push(b);
            }
            Err(why) => {
                path.counters.dropped(why);
                if head < q.size() {
                    used.push((head, 0));
                }
                if held.is_empty() {
                    // Returned for good: the frame starts after it.
                    start = q.next_avail();
                    continue;
                }
                // A bad buffer in the middle of a frame: rewinding would
                // return it twice, so give back what is held and drop.
                used.extend(held.iter().map(|b| (b.head, 0)));
                return Ok(Placement::Dropped(DropReason::NoBuffer));
            }
        }
    }

    let Ok(num_buffers) = u16::try_from(held.len()) else {
        used.extend(held.iter().map(|b| (b.head, 0)));
        return Ok(Placement::Dropped(DropReason::NoBuffer));
    };
    let (hdr, hdr_len) = rx_header(path.hdr_len, vnet, num_buffers);
    // Header and frame go straight into the guest's buffers, as one byte
    // stream split over the segments (no staging copy).
    let stream = [&hdr[..hdr_len], frame];
    let total = hdr_len + frame.len();

    let mut off = 0usize;
    let mut lens = Vec::with_capacity(held.len());
    let mut failed = false;
    for b in &held {
        let mut written = 0usize;
        for &(addr, len) in &b.segs {
            if off >= total {
                break;
            }
            let n = len.min(total - off);
            path.will_write(mem, addr, n);
            if write_stream(mem, addr, &stream, off, n).is_err() {
                failed = true;
                break;
            }
            off += n;
            written += n;
        }
        if failed {
            break;
        }
        lens.push(written);
    }
    if failed {
        used.extend(held.iter().map(|b| (b.head, 0)));
        return Ok(Placement::Dropped(DropReason::BadDescriptor));
    }
    for (b, len) in held.iter().zip(lens) {
        // `len` is at most hdr_len + MAX_GSO_FRAME.
        used.push((b.head, len as u32));
    }
    Ok(Placement::Delivered)
}

/// Writes bytes `off..off + n` of the concatenation of `parts` at `addr`.
fn write_stream<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    parts: &[&[u8]],
    mut off: usize,
    mut n: usize,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = addr;
    for part in parts {
        if n == 0 {
            break;
        }
        if off >= part.len() {
            off -= part.len();
            continue;
        }
        let k = n.min(part.len() - off);
        mem.write_slice(&part[off..off + k], at)?;
        at = at
            .checked_add(k as u64)
            .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(at))?;
        n -= k;
        off = 0;
    }
    Ok(())
}

/// Tells the guest to kick the RX queue when it adds a buffer past
/// `seen` and checks whether it already has (then the caller tries again).
fn arm_rx_kick<M: GuestMemory>(mem: &M, q: &Queue, seen: u16) -> Result<bool, RingError> {
    if q.event_idx_enabled() {
        let addr = GuestAddress(q.used_ring())
            .checked_add(4 + 8 * u64::from(q.size()))
            .ok_or(RingError::Queue(virtio_queue::Error::AddressOverflow))?;
        mem.store(seen.to_le(), addr, Ordering::Relaxed)
            .map_err(RingError::Memory)?;
    } else {
        // Kicks are never suppressed on RX; make sure of it.
        mem.store(0u16, GuestAddress(q.used_ring()), Ordering::Relaxed)
            .map_err(RingError::Memory)?;
    }
    fence(Ordering::SeqCst);
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(RingError::Queue)?;
    Ok(avail.0 != seen)
}

/// Runs the RX queue: frames from `egress` go into the guest's buffers
/// until either runs out.
pub fn process_rx<M: GuestMemory>(
    mem: &M,
    q: &mut Queue,
    path: &NetPath<'_>,
    egress: &EgressQueue,
) -> Result<QueueRun, RingError> {
    if !q.is_valid(mem) {
        return Err(RingError::Layout);
    }
    path.will_write_used(mem, q);
    let mut run = QueueRun::default();
    let old_used = q.next_used();
    let mut used = Vec::with_capacity(USED_BATCH);
    let mut retries = 0;
    while let Some(packet) = egress.pop() {
        let frame = &packet.frame;
        if frame.len() < MIN_FRAME || frame.len() > packet.offload.max_frame() {
            path.counters.dropped(DropReason::Malformed);
            continue;
        }
        if !path.rx_offloads.accepts(&packet.offload) {
            // Queued before the guest (re)negotiated without offloads:
            // finish it here and deliver the plain frames in its place.
            let mut plain = Vec::new();
            if offload::finish(packet.frame, &packet.offload, &mut plain).is_err() {
                path.counters.dropped(DropReason::Malformed);
            }
            for f in plain.into_iter().rev() {
                egress.unpop(Packet::plain(f));
            }
            continue;
        }
        let vnet = offload::rx_header(frame, &packet.offload);
        let before = used.len();
        match place_frame(mem, q, path, frame, &vnet, &mut used)? {
            Placement::Delivered => path.counters.transmitted(frame.len()),
            Placement::Dropped(why) => path.counters.dropped(why),
            Placement::NoBuffers { exhausted_at } => {
                egress.unpop(packet);
                run.chains += used.len() - before;
                publish_used(mem, q, &mut used)?;
                if retries < RX_RETRIES && arm_rx_kick(mem, q, exhausted_at)? {
                    retries += 1;
                    continue;
                }
                run.starved = true;
                break;
            }
        }
        run.chains += used.len() - before;
        if used.len() >= USED_BATCH {
            publish_used(mem, q, &mut used)?;
        }
    }
    publish_used(mem, q, &mut used)?;
    run.signal = should_signal(mem, q, old_used, q.next_used())?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::sim::SimRing;
    use crate::vhost::{lock, OFFERED_FEATURES};
    use proptest::prelude::*;
    use std::sync::Mutex;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<u8>>>);

    impl Ingress for Recorder {
        fn ingress(&self, port: PortId, frame: &[u8]) {
            assert_eq!(port, 7);
            lock(&self.0).push(frame.to_vec());
        }
    }

    impl Recorder {
        fn frames(&self) -> Vec<Vec<u8>> {
            lock(&self.0).clone()
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    fn path(counters: &PortCounters, hdr_len: usize, mrg: bool) -> NetPath<'_> {
        NetPath {
            port: 7,
            hdr_len,
            mrg_rxbuf: mrg,
            tx_offloads: TxOffloads::default(),
            rx_offloads: RxOffloads::default(),
            counters,
            writes: None,
        }
    }

    /// Writes header + frame at `addr` and returns the total length.
    fn put_tx(ring: &SimRing, addr: u64, f: &[u8]) -> u32 {
        let mut buf = vec![0u8; NET_HDR_LEN];
        buf.extend_from_slice(f);
        ring.write(addr, &buf);
        buf.len() as u32
    }

    #[test]
    fn header_helpers() {
        assert_eq!(net_hdr_len(1 << VIRTIO_F_VERSION_1), NET_HDR_LEN);
        assert_eq!(net_hdr_len(1 << VIRTIO_NET_F_MRG_RXBUF), NET_HDR_LEN);
        assert_eq!(net_hdr_len(0), LEGACY_NET_HDR_LEN);
        let plain = VnetHdr::default();
        let (h, n) = rx_header(NET_HDR_LEN, &plain, 3);
        assert_eq!(n, 12);
        assert_eq!(h, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0]);
        let (h, n) = rx_header(LEGACY_NET_HDR_LEN, &plain, 3);
        assert_eq!(n, 10);
        assert!(h[..n].iter().all(|&b| b == 0));
        let gso = VnetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 74,
            gso_size: 1428,
            csum_start: 54,
            csum_offset: 16,
        };
        let (h, _) = rx_header(NET_HDR_LEN, &gso, 2);
        assert_eq!(VnetHdr::parse(&h), Some(gso));
        assert_eq!(&h[10..], &[2, 0]);
        let none = TxOffloads::default();
        let buf = frame(12 + 60, 1);
        assert_eq!(
            strip_tx_header(&buf, 12, none),
            Ok((&buf[12..], Offload::NONE))
        );
        assert_eq!(
            strip_tx_header(&buf[..12 + 13], 12, none),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            strip_tx_header(&buf[..5], 12, none),
            Err(DropReason::Malformed)
        );
        let big = vec![0u8; 12 + MAX_FRAME + 1];
        assert_eq!(strip_tx_header(&big, 12, none), Err(DropReason::Malformed));
        assert!(strip_tx_header(&big[..12 + MAX_FRAME], 12, none).is_ok());
        // With offloads negotiated the header is read: a checksum request
        // pointing outside the frame is refused.
        let all = tx_offloads(OFFERED_FEATURES);
        assert_eq!(
            strip_tx_header(&buf, 12, all),
            Err(DropReason::Malformed),
            "garbage in the header"
        );
        let mut buf = buf;
        buf[..12].fill(0);
        assert!(strip_tx_header(&buf, 12, all).is_ok(), "a plain header");
        let mut bad = buf.clone();
        bad[..10].copy_from_slice(
            &VnetHdr {
                flags: 1,
                csum_start: 70,
                csum_offset: 16,
                ..VnetHdr::default()
            }
            .to_bytes(),
        );
        assert_eq!(strip_tx_header(&bad, 12, all), Err(DropReason::Malformed));
        assert_eq!(
            strip_tx_header(&bad, 12, none).map(|r| r.1),
            Ok(Offload::NONE)
        );
    }

    #[test]
    fn tx_good_frame_delivered_exactly() {
        let mut ring = SimRing::new(16).unwrap();
        let f = frame(60, 1);
        let len = put_tx(&ring, SimRing::BUF, &f);
        ring.set_desc(0, SimRing::BUF, len, 0, 0);
        ring.offer(0);
        let counters = PortCounters::default();
        let rec = Recorder::default();
        let run = process_tx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &rec,
        )
        .unwrap();
        assert_eq!(rec.frames(), vec![f]);
        assert_eq!(ring.used(), vec![(0, 0)]);
        assert_eq!(run.chains, 1);
        assert!(run.signal);
        let s = counters.snapshot();
        assert_eq!((s.rx_frames, s.rx_bytes), (1, 60));
        assert_eq!(s.drops, Default::default());
    }

    /// Lets `budget` frames through, then asks the port to wait.
    struct Shaped {
        rec: Recorder,
        budget: Mutex<usize>,
    }

    impl Ingress for Shaped {
        fn ingress(&self, port: PortId, frame: &[u8]) {
            self.rec.ingress(port, frame);
        }

        fn reserve_tx(&self, _: PortId, _: usize, _: Instant) -> Result<(), Duration> {
            let mut b = lock(&self.budget);
            if *b == 0 {
                return Err(Duration::from_millis(3));
            }
            *b -= 1;
            Ok(())
        }
    }

    #[test]
    fn shaped_tx_leaves_frames_in_the_ring_until_allowed() {
        let mut ring = SimRing::new(16).unwrap();
        let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(60, i)).collect();
        for (i, f) in frames.iter().enumerate() {
            let addr = SimRing::BUF + 0x1000 * i as u64;
            let len = put_tx(&ring, addr, f);
            ring.set_desc(i as u16, addr, len, 0, 0);
            ring.offer(i as u16);
        }
        let counters = PortCounters::default();
        let shaped = Shaped {
            rec: Recorder::default(),
            budget: Mutex::new(2),
        };
        let p = path(&counters, 12, false);
        let run = process_tx(&ring.mem, &mut ring.queue, &p, &shaped).unwrap();
        assert_eq!(run.throttled, Some(Duration::from_millis(3)));
        assert_eq!(run.chains, 2);
        assert_eq!(ring.used(), vec![(0, 0), (1, 0)]);
        assert_eq!(shaped.rec.frames(), frames[..2].to_vec());
        // Nothing dropped, and nothing more taken while throttled.
        let run = process_tx(&ring.mem, &mut ring.queue, &p, &shaped).unwrap();
        assert_eq!((run.chains, run.throttled.is_some()), (0, true));
        assert_eq!(counters.snapshot().drops, Default::default());
        // Allowed again: the rest, in order.
        *lock(&shaped.budget) = 10;
        let run = process_tx(&ring.mem, &mut ring.queue, &p, &shaped).unwrap();
        assert_eq!((run.chains, run.throttled), (3, None));
        assert_eq!(shaped.rec.frames(), frames);
        assert_eq!(ring.used().len(), 5);
    }

    #[test]
    fn tx_budget_bounds_a_run_and_later_runs_drain_the_rest() {
        // More chains than one run may take: the guest posts each chain
        // again as soon as the device takes it.
        let mut ring = SimRing::new(64).unwrap();
        let len = put_tx(&ring, SimRing::BUF, &frame(60, 1));
        for i in 0..64 {
            ring.set_desc(i, SimRing::BUF, len, 0, 0);
        }
        let total = 2 * TX_BUDGET + 88;
        let guest = ring.busy_guest(total as u16);
        let counters = PortCounters::default();
        let p = path(&counters, 12, false);
        let mut runs = Vec::new();
        while runs.len() < 10 {
            let run = process_tx(&ring.mem, &mut ring.queue, &p, &guest).unwrap();
            assert!(run.chains <= TX_BUDGET);
            runs.push((run.chains, run.budget_spent));
            // While work is left the guest is told not to kick (used flags
            // NO_NOTIFY): the port must come back by itself.
            let no_notify = ring.read(SimRing::USED, 2) == [1, 0];
            assert_eq!(no_notify, run.budget_spent);
            if !run.budget_spent {
                break;
            }
        }
        assert_eq!(
            runs,
            [(TX_BUDGET, true), (TX_BUDGET, true), (88, false)],
            "chains and budget_spent per run"
        );
        assert_eq!(guest.frames(), total);
        assert_eq!(usize::from(ring.used_idx()), total);
        assert_eq!(counters.snapshot().rx_frames, total as u64);
    }

    #[test]
    fn tx_header_and_frame_split_over_descriptors() {
        let mut ring = SimRing::new(16).unwrap();
        let f = frame(1514, 9);
        let mut all = vec![0u8; NET_HDR_LEN];
        all.extend_from_slice(&f);
        // 5 + 7 header bytes, then the frame in two pieces, scattered.
        let pieces = [
            (0x3000u64, 0..5),
            (0x5000, 5..12),
            (0x7000, 12..700),
            (0x4000, 700..all.len()),
        ];
        for (i, (addr, r)) in pieces.iter().enumerate() {
            ring.write(*addr, &all[r.clone()]);
            let last = i == pieces.len() - 1;
            ring.set_desc(
                i as u16 + 2,
                *addr,
                r.len() as u32,
                if last { 0 } else { NEXT },
                i as u16 + 3,
            );
        }
        ring.offer(2);
        let counters = PortCounters::default();
        let rec = Recorder::default();
        process_tx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &rec,
        )
        .unwrap();
        assert_eq!(rec.frames(), vec![f]);
        assert_eq!(ring.used(), vec![(2, 0)]);
    }

    #[test]
    fn tx_hostile_chains_are_counted_and_returned() {
        let mut ring = SimRing::new(16).unwrap();
        let good = frame(64, 3);
        let len = put_tx(&ring, 0x8000, &good);
        // Loop: 0 -> 1 -> 0 ...
        ring.set_desc(0, 0x3000, 40, NEXT, 1);
        ring.set_desc(1, 0x3100, 40, NEXT, 0);
        // Outside guest memory.
        ring.set_desc(2, SimRing::MEM_SIZE - 4, 100, 0, 0);
        // Wrong direction (write-only on TX).
        ring.set_desc(3, 0x3000, 80, WRITE, 0);
        // Oversize and undersize frames.
        ring.set_desc(4, 0x3000, (NET_HDR_LEN + MAX_FRAME + 1) as u32, 0, 0);
        ring.set_desc(5, 0x3000, (NET_HDR_LEN + MIN_FRAME - 1) as u32, 0, 0);
        // Successor outside the table.
        ring.set_desc(6, 0x3000, 30, NEXT, 40);
        // A good one.
        ring.set_desc(7, 0x8000, len, 0, 0);
        // Address range wrapping around u64.
        ring.set_desc(8, u64::MAX - 8, 64, 0, 0);
        for h in [0, 2, 3, 4, 5, 6, 20, 8, 7] {
            ring.offer(h);
        }
        let counters = PortCounters::default();
        let rec = Recorder::default();
        let run = process_tx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &rec,
        )
        .unwrap();
        assert_eq!(rec.frames(), vec![good]);
        let heads: Vec<u32> = ring.used().iter().map(|u| u.0).collect();
        assert_eq!(
            heads,
            vec![0, 2, 3, 4, 5, 6, 8, 7],
            "head 20 names no chain"
        );
        assert!(ring.used().iter().all(|u| u.1 == 0));
        assert_eq!(run.chains, 8);
        let s = counters.snapshot();
        assert_eq!(
            s.drops.bad_descriptor, 6,
            "loop, outside, direction, next, head, wrap"
        );
        assert_eq!(s.drops.malformed, 2, "oversize, undersize");
        assert_eq!(s.rx_frames, 1);
        assert_eq!(ring.queue.next_avail(), 9);
    }

    #[test]
    fn tx_chain_length_limit() {
        for (n, ok) in [
            (MAX_CHAIN_DESCRIPTORS, true),
            (MAX_CHAIN_DESCRIPTORS + 1, false),
        ] {
            let mut ring = SimRing::new(128).unwrap();
            let f = frame(200, 5);
            let mut all = vec![0u8; NET_HDR_LEN];
            all.extend_from_slice(&f);
            // Spread header + frame over n descriptors.
            let per = all.len().div_ceil(n);
            let mut off = 0;
            for i in 0..n {
                let take = per.min(all.len() - off);
                let addr = 0x3000 + 0x100 * i as u64;
                ring.write(addr, &all[off..off + take]);
                off += take;
                let last = i == n - 1;
                ring.set_desc(
                    i as u16,
                    addr,
                    take as u32,
                    if last { 0 } else { NEXT },
                    i as u16 + 1,
                );
            }
            ring.offer(0);
            let counters = PortCounters::default();
            let rec = Recorder::default();
            process_tx(
                &ring.mem,
                &mut ring.queue,
                &path(&counters, 12, false),
                &rec,
            )
            .unwrap();
            assert_eq!(rec.frames().len(), usize::from(ok), "{n} descriptors");
            if ok {
                assert_eq!(rec.frames()[0], f);
            } else {
                assert_eq!(counters.snapshot().drops.bad_descriptor, 1);
            }
            assert_eq!(ring.used(), vec![(0, 0)]);
        }
    }

    #[test]
    fn tx_indirect_table() {
        let mut ring = SimRing::new(8).unwrap();
        let f = frame(100, 2);
        ring.write(0x6000, &[0u8; NET_HDR_LEN]);
        ring.write(0x6100, &f);
        // The indirect table at 0x5000: header, then frame.
        let table = [
            (0x6000u64, NET_HDR_LEN as u32, NEXT, 1u16),
            (0x6100, 100, 0, 0),
        ];
        for (i, (addr, len, flags, next)) in table.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            ring.write(0x5000 + 16 * i as u64, &raw);
        }
        ring.set_desc(3, 0x5000, 32, INDIRECT, 0);
        ring.offer(3);
        let counters = PortCounters::default();
        let rec = Recorder::default();
        process_tx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &rec,
        )
        .unwrap();
        assert_eq!(rec.frames(), vec![f]);
        assert_eq!(ring.used(), vec![(3, 0)]);
    }

    #[test]
    fn tx_corrupt_avail_index_stops_the_queue() {
        let mut ring = SimRing::new(16).unwrap();
        let f = frame(60, 1);
        let len = put_tx(&ring, SimRing::BUF, &f);
        ring.set_desc(0, SimRing::BUF, len, 0, 0);
        ring.offer(0);
        ring.set_avail_idx(40);
        let counters = PortCounters::default();
        let rec = Recorder::default();
        let res = process_tx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &rec,
        );
        assert!(matches!(res, Err(RingError::Queue(_))), "{res:?}");
        assert!(rec.frames().is_empty());
    }

    #[test]
    fn tx_rings_outside_memory() {
        let mut ring = SimRing::new(16).unwrap();
        ring.queue
            .try_set_used_ring_address(GuestAddress(SimRing::MEM_SIZE - 8))
            .unwrap();
        let counters = PortCounters::default();
        let res = process_tx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &Recorder::default(),
        );
        assert!(matches!(res, Err(RingError::Layout)));
    }

    #[test]
    fn tx_event_idx_and_interrupt_suppression() {
        let mut ring = SimRing::new(16).unwrap();
        ring.queue.set_event_idx(true);
        let f = frame(60, 1);
        let len = put_tx(&ring, SimRing::BUF, &f);
        for i in 0..4 {
            ring.set_desc(i, SimRing::BUF, len, 0, 0);
        }
        let counters = PortCounters::default();
        let rec = Recorder::default();
        // The guest wants an interrupt once used passes 5: not yet.
        ring.set_used_event(5);
        ring.offer(0);
        let run = process_tx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &rec,
        )
        .unwrap();
        assert!(!run.signal);
        // TX kicks re-armed at the next avail index.
        assert_eq!(ring.avail_event(), 1);
        // Now it asks for one at 1: used goes 1 -> 2, crossing it.
        ring.set_used_event(1);
        ring.offer(1);
        let run = process_tx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &rec,
        )
        .unwrap();
        assert!(run.signal);

        // Without EVENT_IDX, NO_INTERRUPT in the avail flags is honoured.
        let mut ring = SimRing::new(16).unwrap();
        ring.set_desc(0, SimRing::BUF, put_tx(&ring, SimRing::BUF, &f), 0, 0);
        ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT as u16);
        ring.offer(0);
        let run = process_tx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &rec,
        )
        .unwrap();
        assert!(!run.signal);
        assert_eq!(run.chains, 1);
    }

    fn rx_ring(bufs: &[u32], mrg_size: u16) -> SimRing {
        let ring = SimRing::new(mrg_size).unwrap();
        for (i, &len) in bufs.iter().enumerate() {
            ring.set_desc(i as u16, 0x3000 + 0x800 * i as u64, len, WRITE, 0);
        }
        ring
    }

    fn egress_with(frames: &[Vec<u8>]) -> EgressQueue {
        let q = EgressQueue::new(64, 64 * 2048).unwrap();
        for f in frames {
            assert!(q.push(f.clone()));
        }
        q
    }

    #[test]
    fn rx_single_buffer() {
        let mut ring = rx_ring(&[2048], 16);
        ring.offer(0);
        let f = frame(100, 4);
        let egress = egress_with(std::slice::from_ref(&f));
        let counters = PortCounters::default();
        let run = process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &egress,
        )
        .unwrap();
        assert_eq!(ring.used(), vec![(0, 112)]);
        let got = ring.read(0x3000, 112);
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&got[12..], &f[..]);
        assert!(run.signal && !run.starved);
        assert!(egress.is_empty());
        let s = counters.snapshot();
        assert_eq!((s.tx_frames, s.tx_bytes), (1, 100));
    }

    #[test]
    fn rx_records_the_ram_file_pages_it_writes() {
        // The RAM file maps guest memory from file offset 1 MiB, as QEMU's
        // above-4G region does.
        let file = tempfile::tempfile().unwrap();
        file.set_len(0x10_0000 + SimRing::MEM_SIZE).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            SimRing::MEM_SIZE as usize,
            Some(vm_memory::FileOffset::new(file, 0x10_0000)),
        )])
        .unwrap();
        let mut ring = SimRing::new(16).unwrap();
        ring.mem = mem;
        ring.set_desc(0, 0x3000, 2048, WRITE, 0);
        ring.set_desc(1, 0x5800, 2048, WRITE, 0);
        ring.offer(0);
        ring.offer(1);
        let egress = egress_with(&[frame(100, 1), frame(1500, 2)]);
        let counters = PortCounters::default();
        let log = PageLog::new(512);
        let mut p = path(&counters, 12, false);
        p.writes = Some(&log);
        process_rx(&ring.mem, &mut ring.queue, &p, &egress).unwrap();
        assert_eq!(ring.used(), vec![(0, 112), (1, 1512)]);
        // The used ring (page 2 of guest memory) and both buffers (pages 3
        // and 5), each 256 pages further into the file.
        assert_eq!(log.drain().unwrap(), [258, 259, 261]);
    }

    #[test]
    fn a_write_into_memory_without_a_file_poisons_the_log() {
        let mut ring = rx_ring(&[2048], 16);
        ring.offer(0);
        let egress = egress_with(&[frame(100, 4)]);
        let counters = PortCounters::default();
        let log = PageLog::new(512);
        let mut p = path(&counters, 12, false);
        p.writes = Some(&log);
        process_rx(&ring.mem, &mut ring.queue, &p, &egress).unwrap();
        assert!(log.drain().is_err());
    }

    #[test]
    fn rx_legacy_header() {
        let mut ring = rx_ring(&[2048], 16);
        ring.offer(0);
        let f = frame(100, 4);
        let egress = egress_with(std::slice::from_ref(&f));
        let counters = PortCounters::default();
        process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 10, false),
            &egress,
        )
        .unwrap();
        assert_eq!(ring.used(), vec![(0, 110)]);
        let got = ring.read(0x3000, 110);
        assert!(got[..10].iter().all(|&b| b == 0));
        assert_eq!(&got[10..], &f[..]);
    }

    #[test]
    fn rx_mergeable_spans_buffers() {
        let mut ring = rx_ring(&[512, 512, 512, 512], 16);
        for h in 0..4 {
            ring.offer(h);
        }
        let f = frame(1400, 8);
        let egress = egress_with(std::slice::from_ref(&f));
        let counters = PortCounters::default();
        let run = process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, true),
            &egress,
        )
        .unwrap();
        assert_eq!(ring.used(), vec![(0, 512), (1, 512), (2, 388)]);
        assert_eq!(run.chains, 3);
        let mut got = Vec::new();
        for (i, n) in [(0u64, 512), (1, 512), (2, 388)] {
            got.extend(ring.read(0x3000 + 0x800 * i, n));
        }
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0]);
        assert_eq!(&got[12..], &f[..]);
        assert_eq!(ring.queue.next_avail(), 3);
    }

    #[test]
    fn rx_mergeable_rewinds_until_enough_buffers() {
        let mut ring = rx_ring(&[512, 512, 512], 16);
        ring.offer(0);
        ring.offer(1);
        let f = frame(1400, 8);
        let egress = egress_with(std::slice::from_ref(&f));
        let counters = PortCounters::default();
        let run = process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, true),
            &egress,
        )
        .unwrap();
        assert!(run.starved);
        assert!(ring.used().is_empty());
        assert_eq!(ring.queue.next_avail(), 0, "rewound");
        assert_eq!(egress.len(), 1);
        ring.offer(2);
        let run = process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, true),
            &egress,
        )
        .unwrap();
        assert!(!run.starved);
        assert_eq!(ring.used(), vec![(0, 512), (1, 512), (2, 388)]);
        assert_eq!(ring.read(0x3000 + 10, 2), vec![3, 0]);
        let s = counters.snapshot();
        assert_eq!(s.tx_frames, 1);
        assert_eq!(s.drops, Default::default());
    }

    #[test]
    fn rx_waits_for_buffers() {
        let mut ring = rx_ring(&[2048], 16);
        let egress = egress_with(&[frame(100, 1), frame(200, 2)]);
        let counters = PortCounters::default();
        let run = process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &egress,
        )
        .unwrap();
        assert!(run.starved && !run.signal);
        assert_eq!(egress.len(), 2);
        assert_eq!(egress.pop().unwrap().frame, frame(100, 1), "order kept");
        assert_eq!(counters.snapshot().drops, Default::default());
    }

    #[test]
    fn rx_event_idx_arms_the_kick() {
        let mut ring = rx_ring(&[2048, 2048], 16);
        ring.queue.set_event_idx(true);
        ring.offer(0);
        let egress = egress_with(&[frame(100, 1), frame(200, 2)]);
        let counters = PortCounters::default();
        let run = process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &egress,
        )
        .unwrap();
        assert!(run.starved);
        assert_eq!(ring.used(), vec![(0, 112)]);
        assert_eq!(ring.avail_event(), 1, "kick wanted for the next buffer");
        // used_event 0: used moved 0 -> 1, so the guest is interrupted.
        assert!(run.signal);
        ring.offer(1);
        process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &egress,
        )
        .unwrap();
        assert_eq!(ring.used(), vec![(0, 112), (1, 212)]);
    }

    #[test]
    fn rx_buffer_too_small_drops_the_frame() {
        let mut ring = rx_ring(&[100, 2048], 16);
        ring.offer(0);
        ring.offer(1);
        let egress = egress_with(&[frame(200, 1), frame(60, 2)]);
        let counters = PortCounters::default();
        process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &egress,
        )
        .unwrap();
        assert_eq!(ring.used(), vec![(0, 0), (1, 72)]);
        let s = counters.snapshot();
        assert_eq!(s.drops.no_buffer, 1);
        assert_eq!(s.tx_frames, 1);
    }

    #[test]
    fn rx_bad_buffers_are_returned_and_skipped() {
        let mut ring = rx_ring(&[2048, 2048, 2048, 2048], 16);
        // Readable (wrong direction), outside memory, header-less, good.
        ring.set_desc(0, 0x3000, 2048, 0, 0);
        ring.set_desc(1, SimRing::MEM_SIZE - 16, 2048, WRITE, 0);
        ring.set_desc(2, 0x3000, 4, WRITE, 0);
        for h in 0..4 {
            ring.offer(h);
        }
        let f = frame(300, 6);
        let egress = egress_with(std::slice::from_ref(&f));
        let counters = PortCounters::default();
        process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, true),
            &egress,
        )
        .unwrap();
        assert_eq!(ring.used(), vec![(0, 0), (1, 0), (2, 0), (3, 312)]);
        assert_eq!(ring.read(0x3000 + 0x800 * 3 + 12, 300), f);
        let s = counters.snapshot();
        assert_eq!(s.drops.bad_descriptor, 3);
        assert_eq!(s.tx_frames, 1);
    }

    #[test]
    fn rx_bad_buffer_inside_a_frame_drops_it() {
        let mut ring = rx_ring(&[512, 512, 512], 16);
        ring.set_desc(1, 0x3800, 512, 0, 0);
        for h in 0..3 {
            ring.offer(h);
        }
        let egress = egress_with(&[frame(1400, 1)]);
        let counters = PortCounters::default();
        process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, true),
            &egress,
        )
        .unwrap();
        let mut used = ring.used();
        used.sort();
        assert_eq!(used, vec![(0, 0), (1, 0)]);
        let s = counters.snapshot();
        assert_eq!((s.drops.bad_descriptor, s.drops.no_buffer), (1, 1));
        assert!(egress.is_empty());
    }

    #[test]
    fn rx_corrupt_ring() {
        let mut ring = rx_ring(&[2048], 16);
        ring.set_avail_idx(1000);
        let egress = egress_with(&[frame(100, 1)]);
        let counters = PortCounters::default();
        let res = process_rx(
            &ring.mem,
            &mut ring.queue,
            &path(&counters, 12, false),
            &egress,
        );
        assert!(res.is_err());
    }

    #[test]
    fn chain_check_rules() {
        let mut c = ChainCheck::tx(12, MAX_FRAME);
        assert_eq!(c.finish(), Err(DropReason::BadDescriptor), "empty chain");
        c.step(false, 12, true).unwrap();
        assert_eq!(c.finish(), Err(DropReason::BadDescriptor), "truncated");
        c.step(false, 60, false).unwrap();
        assert_eq!(c.finish(), Ok(72));
        assert_eq!(
            ChainCheck::tx(12, MAX_FRAME).step(true, 1, false),
            Err(DropReason::BadDescriptor)
        );
        assert_eq!(
            ChainCheck::rx().step(false, 1, false),
            Err(DropReason::BadDescriptor)
        );
        assert_eq!(
            ChainCheck::tx(12, MAX_FRAME).step(false, (12 + MAX_FRAME + 1) as u32, false),
            Err(DropReason::Malformed)
        );
        assert_eq!(ChainCheck::rx().step(true, u32::MAX, false), Ok(()));
    }

    #[test]
    fn need_event_examples() {
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(1, 1, 0));
        assert!(vring_need_event(65535, 0, 65535));
        assert!(vring_need_event(3, 10, 0));
        assert!(!vring_need_event(10, 10, 0));
    }

    proptest! {
        #[test]
        fn strip_tx_header_matches_rules(buf in proptest::collection::vec(any::<u8>(), 0..1600), legacy in any::<bool>()) {
            let hdr = if legacy { LEGACY_NET_HDR_LEN } else { NET_HDR_LEN };
            let res = strip_tx_header(&buf, hdr, TxOffloads::default());
            let ok = buf.len() >= hdr + MIN_FRAME && buf.len() <= hdr + MAX_FRAME;
            prop_assert_eq!(res.is_ok(), ok);
            if let Ok((f, off)) = res {
                prop_assert_eq!(f, &buf[hdr..]);
                prop_assert!(off.is_none());
            } else {
                prop_assert_eq!(res, Err(DropReason::Malformed));
            }
        }

        #[test]
        fn chain_check_matches_model(
            rx in any::<bool>(),
            descs in proptest::collection::vec((any::<bool>(), 0u32..1000, any::<bool>()), 0..80),
        ) {
            let mut c = if rx { ChainCheck::rx() } else { ChainCheck::tx(12, MAX_FRAME) };
            let mut result = Ok(());
            for &(w, len, next) in &descs {
                result = c.step(w, len, next);
                if result.is_err() { break; }
            }
            // Model.
            let mut total = 0usize;
            let mut expect = Ok(());
            for (i, &(w, len, _)) in descs.iter().enumerate() {
                if i + 1 > MAX_CHAIN_DESCRIPTORS || w != rx {
                    expect = Err(DropReason::BadDescriptor);
                    break;
                }
                total += len as usize;
                if !rx && total > 12 + MAX_FRAME {
                    expect = Err(DropReason::Malformed);
                    break;
                }
            }
            prop_assert_eq!(result, expect);
            if expect.is_ok() {
                let open = match descs.last() { Some(d) => d.2, None => true };
                prop_assert_eq!(c.finish(), if open { Err(DropReason::BadDescriptor) } else { Ok(total) });
            }
        }

        #[test]
        fn need_event_matches_model(event in any::<u16>(), old in any::<u16>(), step in 0u16..1000) {
            let new = old.wrapping_add(step);
            // Notify iff `event` is one of old, old+1, ..., new-1.
            let crossed = (0..step).any(|i| old.wrapping_add(i) == event);
            prop_assert_eq!(vring_need_event(event, new, old), crossed);
        }
    }
}
