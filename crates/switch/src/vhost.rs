//! A VM port: a vhost-user virtio-net backend that QEMU connects to.
//!
//! QEMU is the vhost-user *frontend*; it connects to the socket this port
//! listens on (`-chardev socket,path=SOCK -netdev vhost-user,chardev=...`),
//! shares the guest RAM (`memory-backend-file,share=on`) and hands over the
//! two virtqueues of a virtio-net device: RX (0, frames towards the guest)
//! and TX (1, frames from the guest). This module moves frames between
//! those rings and the switch:
//!
//! - TX: every available chain is read (readable descriptors only), the
//!   virtio-net header is stripped and the frame goes to
//!   [`Ingress::ingress`]. Malformed or hostile chains are dropped and
//!   counted but still returned to the guest (used length 0), so a buggy or
//!   hostile guest can stall neither itself nor the port.
//! - RX: frames from the port's [`EgressQueue`] are written, behind a
//!   zeroed header, into the guest's write-only buffers (several buffers per
//!   frame when `VIRTIO_NET_F_MRG_RXBUF` is negotiated). When the guest has
//!   no buffer posted the frame is put back and the port waits for the
//!   guest's next RX kick.
//!
//! # Lifecycle
//!
//! `vhost-user-backend` 0.24 binds one set of vrings, one guest-memory map
//! and one worker thread to a [`VhostUserDaemon`], and its request handler
//! keeps per-connection state (owner claimed, features, ring addresses) that
//! is never reset when the frontend goes away. A second QEMU on the same
//! daemon would therefore be refused at `SET_OWNER`. So the port builds a
//! fresh daemon (and fresh per-connection state) for every frontend
//! connection, on a listening socket that lives for the whole life of the
//! port: after a disconnect (guest shutdown, QEMU crash or kill) the old
//! daemon is dropped — which stops its worker thread and unmaps the old
//! guest memory — and the port waits for the next QEMU on the same socket.
//! A guest reboot keeps the connection: QEMU stops and restarts the rings.
//!
//! The port accepts QEMU's connection itself and puts a small message
//! shim between QEMU and the daemon (`fn shim`): QEMU's virtio-net sends
//! `SET_VRING_ENABLE` before its first `SET_FEATURES`, which the `vhost`
//! crate 0.18 rejects by dropping the connection. The shim forwards every
//! message unchanged and slips a `SET_FEATURES(PROTOCOL_FEATURES)` in front
//! of the first early enable.
//!
//! # Migration and RARP
//!
//! Dirty-page logging is offered (`VHOST_F_LOG_ALL` + protocol
//! `LOG_SHMFD`): guest memory is mapped with
//! [`BitmapMmapRegion`], so every write this backend makes into guest RAM
//! (frames, headers, used-ring entries) is recorded in the log QEMU hands
//! over with `SET_LOG_BASE`, and QEMU can live-migrate a VM with this NIC.
//!
//! `VHOST_USER_SEND_RARP` cannot be handled: the `vhost` crate (0.18) has
//! no handler for it and answers it by dropping the whole connection. The
//! `RARP` protocol feature is therefore *not* offered. Instead
//! `VIRTIO_NET_F_GUEST_ANNOUNCE` is offered, so after a migration QEMU asks
//! the guest to announce itself, and the optional connect hook (see
//! [`VmPortHandle::spawn_with_hook`]) runs whenever the guest's rings start
//! on this port, which is when a switch should re-learn the VM's MAC and
//! announce it on the VM's behalf.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic,
    GuestMemoryMmap, Permissions,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::timerfd::TimerFd;

use crate::offload::{self, Offload, RxOffloads, TxOffloads, VnetHdr, VNET_HDR_FIELDS};
use crate::port::{
    DropReason, EgressQueue, Ingress, Packet, PortCounters, PortId, MAX_FRAME, MIN_FRAME,
};
use tandem_dirty::PageLog;

/// Queue index of the receive queue (device → guest).
pub const RX_QUEUE: u16 = 0;
/// Queue index of the transmit queue (guest → device).
pub const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
/// Epoll event id of the egress notifier: ids up to and including
/// `NUM_QUEUES` belong to the vrings and the library's exit event.
const EGRESS_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Epoll event id of the shaping timer: TX may go on.
const THROTTLE_EVENT: u16 = NUM_QUEUES as u16 + 2;
/// Largest ring size the frontend may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Longest descriptor chain accepted (indirect tables included). Linux
/// needs at most MAX_SKB_FRAGS + 2 = 19 for a frame without offloads.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// `struct virtio_net_hdr_v1` (with `num_buffers`): VERSION_1 or MRG_RXBUF.
pub const NET_HDR_LEN: usize = 12;
/// The legacy `struct virtio_net_hdr` without `num_buffers`.
pub const LEGACY_NET_HDR_LEN: usize = 10;
/// Used-ring entries collected before they are published to the guest.
const USED_BATCH: usize = 64;
/// Rounds of "arm the kick, find new buffers, try again" per RX event.
const RX_RETRIES: usize = 8;
/// How often a port without frontend drops what was queued for it.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How long [`VmPortHandle::shutdown`] waits for the port's thread.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Virtio (and vhost-user transport) features the backend offers,
/// checksum and TCP segmentation offload in both directions included (see
/// [`crate::offload`]): a guest may send 64 KiB TCP segments with the
/// checksum unfinished, and takes them whole from a guest that did.
pub const OFFERED_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    | VhostUserVirtioFeatures::LOG_ALL.bits();

/// vhost-user protocol features the backend offers (the `vhost` crate adds
/// `REPLY_ACK` itself). `RARP` is deliberately absent: see the module docs.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::LOG_SHMFD
}

/// Called (in the port's worker thread) each time a guest's rings start on
/// the port: a new frontend, a guest reboot, an incoming migration.
pub type ConnectHook = Box<dyn Fn() + Send + Sync>;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
type Vring = VringRwLock<Mem>;

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
    fn for_features(
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

/// Runs the TX queue: every available chain is read, its frame handed to
/// `ingress`, and the chain returned to the guest.
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
    'ring: loop {
        q.disable_notification(mem).map_err(RingError::Queue)?;
        // One clock read per batch: shaping needs no finer time.
        let now = Instant::now();
        while let Some(chain) = next_chain(mem, q)? {
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

// ---------------------------------------------------------------------------
// The vhost-user backend: one `Conn` per frontend connection.
// ---------------------------------------------------------------------------

/// What a port needs for its I/O, shared by the port and its connections.
struct PortIo {
    id: PortId,
    name: String,
    egress: Arc<EgressQueue>,
    counters: Arc<PortCounters>,
    ingress: Arc<dyn Ingress>,
    on_connect: Option<ConnectHook>,
    /// The exit event of every connection's vring worker thread.
    ///
    /// `vhost-user-backend` 0.24 takes the consumer half returned by
    /// `exit_event`, turns it into a raw fd for its epoll and never closes
    /// it: a fresh eventfd per connection would leak one descriptor per
    /// QEMU (re)connection. So the port owns one eventfd for its whole
    /// life, lends its number to each connection's worker, and drains it
    /// once that worker has exited.
    exit_consumer: EventConsumer,
    exit_notifier: EventNotifier,
    /// Fires when a TX ring held back by shaping may be served again
    /// (non-blocking, so a read after a re-arm cannot block the worker).
    throttle: Mutex<TimerFd>,
    /// Set while replication needs this port's writes into guest RAM.
    write_log: Mutex<Option<Arc<PageLog>>>,
}

impl PortIo {
    fn arm_throttle(&self, wait: Duration) {
        if let Err(e) = lock(&self.throttle).reset(wait, None) {
            // Without the timer the watchdog poke still serves the ring.
            warn!(port = %self.name, error = %e, "cannot arm the shaping timer");
        }
    }

    /// Drops everything queued for the guest (the port is down).
    fn drop_egress(&self) -> usize {
        let n = self.egress.clear();
        for _ in 0..n {
            self.counters.dropped(DropReason::NoBuffer);
        }
        n
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// State of one frontend connection; it is the `VhostUserBackend`.
struct Conn {
    io: Arc<PortIo>,
    mem: Mutex<Mem>,
    features: AtomicU64,
    /// The vrings, as seen by the first event of the connection.
    vrings: Mutex<Vec<Vring>>,
    /// Both rings were ready and enabled at the last check.
    running: AtomicBool,
    /// Whether the rings have run on this connection, and when they last
    /// stopped: a checkpoint stops and restarts them within milliseconds,
    /// which is not a new guest to announce.
    started_once: AtomicBool,
    stopped_at: Mutex<Option<Instant>>,
    /// Per queue: the ring was found corrupt and is ignored until reset.
    broken: [AtomicBool; NUM_QUEUES],
    /// The library's copy of the port's exit notifier, taken by
    /// `exit_event` (made here, where failing is still harmless: a worker
    /// without exit event could never be stopped).
    exit_notifier: Mutex<Option<EventNotifier>>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("port", &self.io.name).finish()
    }
}

impl Conn {
    fn new(io: Arc<PortIo>, mem: Mem) -> io::Result<Self> {
        let exit_notifier = io.exit_notifier.try_clone()?;
        // Nothing is negotiated yet on this connection.
        io.egress.set_accepts(RxOffloads::default());
        Ok(Self {
            io,
            mem: Mutex::new(mem),
            features: AtomicU64::new(0),
            vrings: Mutex::new(Vec::new()),
            running: AtomicBool::new(false),
            started_once: AtomicBool::new(false),
            stopped_at: Mutex::new(None),
            broken: [AtomicBool::new(false), AtomicBool::new(false)],
            exit_notifier: Mutex::new(Some(exit_notifier)),
        })
    }

    fn rings_running(&self) -> bool {
        let vrings = lock(&self.vrings);
        vrings.len() == NUM_QUEUES
            && vrings.iter().all(|v| {
                let s = v.get_ref();
                s.get_queue().ready() && s.is_enabled()
            })
    }

    /// Follows the rings starting and stopping; runs the connect hook when
    /// they start for the first time on this connection or after a real
    /// pause (a guest reboot), not after a checkpoint's brief stop. Returns
    /// true when the rings just started.
    fn note_vrings(&self, vrings: &[Vring]) -> bool {
        {
            let mut cached = lock(&self.vrings);
            if cached.is_empty() && vrings.len() == NUM_QUEUES {
                *cached = vrings.to_vec();
            }
        }
        let running = self.rings_running();
        let was = self.running.swap(running, Ordering::AcqRel);
        if running && !was {
            let first = !self.started_once.swap(true, Ordering::AcqRel);
            let paused = lock(&self.stopped_at)
                .take()
                .map_or(Duration::MAX, |t| t.elapsed());
            if first || paused >= ANNOUNCE_AFTER_PAUSE {
                info!(port = %self.io.name, "guest rings started");
                if let Some(hook) = &self.io.on_connect {
                    hook();
                }
            } else {
                debug!(port = %self.io.name, ?paused, "guest rings restarted");
            }
            return true;
        } else if !running && was {
            *lock(&self.stopped_at) = Some(Instant::now());
            debug!(port = %self.io.name, "guest rings stopped");
        }
        false
    }

    fn ring_broken(&self, queue: u16, e: &RingError) {
        if let Some(flag) = self.broken.get(usize::from(queue)) {
            if !flag.swap(true, Ordering::AcqRel) {
                warn!(port = %self.io.name, queue, error = %e,
                    "guest virtqueue is corrupt; ignoring it until the guest resets the device");
                self.io.counters.dropped(DropReason::BadDescriptor);
            }
        }
    }

    fn is_broken(&self, queue: u16) -> bool {
        self.broken
            .get(usize::from(queue))
            .is_some_and(|b| b.load(Ordering::Acquire))
    }

    fn run_tx(&self, vring: &Vring) {
        if self.is_broken(TX_QUEUE) {
            return;
        }
        let mut state = vring.get_mut();
        if !(state.get_queue().ready() && state.is_enabled()) {
            return;
        }
        let mem = lock(&self.mem).memory();
        let features = self.features.load(Ordering::Acquire);
        let log = lock(&self.io.write_log).clone();
        let path = NetPath::for_features(self.io.id, features, &self.io.counters, log.as_deref());
        match process_tx(&*mem, state.get_queue_mut(), &path, &*self.io.ingress) {
            Ok(run) => {
                if let Some(wait) = run.throttled {
                    self.io.arm_throttle(wait);
                }
                if run.signal {
                    if let Err(e) = state.signal_used_queue() {
                        debug!(port = %self.io.name, error = %e, "cannot signal TX queue");
                    }
                }
            }
            Err(e) => {
                drop(state);
                self.ring_broken(TX_QUEUE, &e);
            }
        }
    }

    fn run_rx(&self, vring: &Vring) {
        let mut state = vring.get_mut();
        if !(state.get_queue().ready() && state.is_enabled()) || self.is_broken(RX_QUEUE) {
            drop(state);
            // Stopped for a checkpoint: the frames wait in the (bounded)
            // egress queue and are delivered when the ring restarts. A
            // ring that never ran, or is corrupt, takes nothing.
            let briefly_stopped = !self.is_broken(RX_QUEUE)
                && self.started_once.load(Ordering::Acquire)
                && lock(&self.stopped_at).is_some_and(|t| t.elapsed() < ANNOUNCE_AFTER_PAUSE);
            if !briefly_stopped {
                self.io.drop_egress();
            }
            return;
        }
        let mem = lock(&self.mem).memory();
        let features = self.features.load(Ordering::Acquire);
        let log = lock(&self.io.write_log).clone();
        let path = NetPath::for_features(self.io.id, features, &self.io.counters, log.as_deref());
        match process_rx(&*mem, state.get_queue_mut(), &path, &self.io.egress) {
            Ok(run) => {
                if run.signal {
                    if let Err(e) = state.signal_used_queue() {
                        debug!(port = %self.io.name, error = %e, "cannot signal RX queue");
                    }
                }
            }
            Err(e) => {
                drop(state);
                self.ring_broken(RX_QUEUE, &e);
                self.io.drop_egress();
            }
        }
    }
}

#[derive(Clone, Debug)]
struct NetBackend(Arc<Conn>);

impl VhostUserBackend for NetBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn acked_features(&self, features: u64) {
        debug!(port = %self.0.io.name, features = format_args!("{features:#x}"), "features acked");
        self.0.features.store(features, Ordering::Release);
        self.0.io.egress.set_accepts(rx_offloads(features));
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        offered_protocol_features()
    }

    fn reset_device(&self) {
        self.0.running.store(false, Ordering::Release);
        self.0.io.egress.set_accepts(RxOffloads::default());
        for b in &self.0.broken {
            b.store(false, Ordering::Release);
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library sets it on the queues; they are read from there.
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *lock(&self.0.mem) = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let notifier = lock(&self.0.exit_notifier).take()?;
        // SAFETY: an alias of the port's own exit eventfd, which outlives
        // every connection. The library (vhost-user-backend 0.24,
        // `VringEpollHandler::new`) only converts it with `into_raw_fd`
        // to register it in its epoll and never closes it, so the port's
        // `exit_consumer` stays its only owner; the unit test
        // `exit_event_fd_is_not_closed_by_the_library` guards that.
        let consumer = unsafe { EventConsumer::from_raw_fd(self.0.io.exit_consumer.as_raw_fd()) };
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend stopped the ring (GET_VRING_BASE: guest reset,
        // shutdown or migration); a restarted ring gets a fresh chance.
        if let Some(b) = self.0.broken.get(queue_index as usize) {
            b.store(false, Ordering::Release);
        }
        if self.0.running.swap(false, Ordering::AcqRel) {
            *lock(&self.0.stopped_at) = Some(Instant::now());
            debug!(port = %self.0.io.name, queue_index, "guest rings stopped");
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Never return an error: the library would end the worker thread
        // and with it the port.
        let conn = &self.0;
        if device_event == EGRESS_EVENT {
            // Drain before popping so that no wake-up is lost.
            let _ = conn.io.egress.notifier().read();
        }
        if conn.note_vrings(vrings) {
            // A restarted ring may hold buffers the guest made available
            // while it was stopped, with the kick already spent: with
            // EVENT_IDX the guest will not kick again for them. Serve both
            // queues now, as if kicked.
            if let Some(v) = vrings.get(usize::from(TX_QUEUE)) {
                conn.run_tx(v);
            }
            if let Some(v) = vrings.get(usize::from(RX_QUEUE)) {
                conn.run_rx(v);
            }
            // An interrupt sent while the ring was being stopped may have
            // gone to a call descriptor QEMU has since replaced; a guest
            // waiting for TX completions would then wait forever. A spare
            // interrupt costs the guest one look at its rings.
            for v in vrings {
                let _ = v.signal_used_queue();
            }
            return Ok(());
        }
        match device_event {
            EGRESS_EVENT => {
                // Also a watchdog tick (see `VmPortHandle::poke`): serve TX
                // too, in case a kick was lost around a ring restart.
                if let Some(v) = vrings.get(usize::from(TX_QUEUE)) {
                    conn.run_tx(v);
                }
                match vrings.get(usize::from(RX_QUEUE)) {
                    Some(v) => conn.run_rx(v),
                    None => {
                        conn.io.drop_egress();
                    }
                }
            }
            RX_QUEUE => match vrings.get(usize::from(RX_QUEUE)) {
                Some(v) => conn.run_rx(v),
                None => {
                    conn.io.drop_egress();
                }
            },
            TX_QUEUE => {
                if let Some(v) = vrings.get(usize::from(TX_QUEUE)) {
                    conn.run_tx(v);
                }
            }
            THROTTLE_EVENT => {
                // Non-blocking: nothing to read if it was re-armed since.
                let _ = lock(&conn.io.throttle).wait();
                if let Some(v) = vrings.get(usize::from(TX_QUEUE)) {
                    conn.run_tx(v);
                }
            }
            other => debug!(port = %conn.io.name, event = other, "unexpected event"),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The port: a listening socket and a thread serving one frontend at a time.
// ---------------------------------------------------------------------------

/// Settings of a VM port.
#[derive(Debug, Clone)]
pub struct VmPortConfig {
    pub id: PortId,
    /// Where QEMU connects; created (replacing a stale file) by the port.
    pub socket: PathBuf,
    /// For logs.
    pub name: String,
}

struct Shared {
    stop: AtomicBool,
    connections: AtomicU64,
    current: Mutex<Option<Arc<Conn>>>,
    shutdown: Mutex<Option<ShutdownHandle>>,
}

/// A running VM port. Dropping it stops it like [`VmPortHandle::shutdown`].
pub struct VmPortHandle {
    io: Arc<PortIo>,
    shared: Arc<Shared>,
    socket: PathBuf,
    name: String,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for VmPortHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmPortHandle")
            .field("name", &self.name)
            .field("socket", &self.socket)
            .field("connected", &self.is_connected())
            .field("connections", &self.connections())
            .finish()
    }
}

impl VmPortHandle {
    /// Starts serving `cfg.socket` in background threads. Frames the guest
    /// transmits (virtio-net header stripped) go to
    /// `ingress.ingress(cfg.id, frame)`; frames in `egress` are written into
    /// the guest's RX buffers. After QEMU disconnects it listens again on
    /// the same socket for the next QEMU, without affecting other ports.
    pub fn spawn(
        cfg: VmPortConfig,
        egress: Arc<EgressQueue>,
        counters: Arc<PortCounters>,
        ingress: Arc<dyn Ingress>,
    ) -> io::Result<VmPortHandle> {
        Self::spawn_with_hook(cfg, egress, counters, ingress, None)
    }

    /// [`spawn`](Self::spawn), plus a hook run (in the port's worker
    /// thread, so it must not block) each time a guest's rings start on
    /// the port: when a frontend attached and its guest driver is up, and
    /// again after a guest reboot or an incoming migration. It stands in
    /// for `VHOST_USER_SEND_RARP`, which the `vhost` crate cannot deliver.
    pub fn spawn_with_hook(
        cfg: VmPortConfig,
        egress: Arc<EgressQueue>,
        counters: Arc<PortCounters>,
        ingress: Arc<dyn Ingress>,
        on_connect: Option<ConnectHook>,
    ) -> io::Result<VmPortHandle> {
        let socket = SocketFile::bind(&cfg.socket).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("listening on {}: {e}", cfg.socket.display()),
            )
        })?;
        let (exit_consumer, exit_notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let throttle = TimerFd::new()?;
        // SAFETY: fcntl(2) on a descriptor `throttle` owns; only the
        // status flags change.
        if unsafe { libc::fcntl(throttle.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let io = Arc::new(PortIo {
            id: cfg.id,
            name: cfg.name.clone(),
            egress,
            counters,
            ingress,
            on_connect,
            exit_consumer,
            exit_notifier,
            throttle: Mutex::new(throttle),
            write_log: Mutex::new(None),
        });
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            current: Mutex::new(None),
            shutdown: Mutex::new(None),
        });
        let thread = {
            let shared = shared.clone();
            let io = io.clone();
            std::thread::Builder::new()
                .name(format!("vhost-{}", cfg.name))
                .spawn(move || serve(io, shared, socket))?
        };
        info!(port = %cfg.name, socket = %cfg.socket.display(), "vhost-user port listening");
        Ok(VmPortHandle {
            io,
            shared,
            socket: cfg.socket,
            name: cfg.name,
            thread: Some(thread),
        })
    }

    /// A frontend is attached and its rings run (or stopped only briefly,
    /// as they do for every checkpoint).
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.current).as_ref().is_some_and(|c| {
            // A checkpoint stops the rings for a few milliseconds each
            // epoch; the port stays up through that.
            c.rings_running()
                || (c.started_once.load(Ordering::Acquire)
                    && lock(&c.stopped_at).is_some_and(|t| t.elapsed() < ANNOUNCE_AFTER_PAUSE))
        })
    }

    /// Wakes the port's worker to serve both rings now. The switch's
    /// housekeeping calls it periodically: a kick or interrupt lost around
    /// a ring restart (every checkpoint restarts the rings) then costs a
    /// short delay instead of a stalled guest.
    pub fn poke(&self) {
        if let Some(c) = lock(&self.shared.current).as_ref() {
            let _ = c.io.egress.notifier().write(1);
        }
    }

    /// Records every write this port makes into guest RAM in `log` (as
    /// pages of the RAM file), or stops recording. Takes effect at the next
    /// ring service; replication installs it before its first checkpoint.
    pub fn set_write_log(&self, log: Option<Arc<PageLog>>) {
        *lock(&self.io.write_log) = log;
    }

    /// How many frontends have attached so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Stops serving: the frontend (if any) is disconnected, the socket file
    /// removed and the threads joined (waiting at most a few seconds).
    pub fn shutdown(self) {
        drop(self)
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = lock(&self.shared.shutdown).take() {
            h.shutdown();
        }
        // Wakes an accept that is waiting for a connection.
        let _ = UnixStream::connect(&self.socket);
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            if thread.join().is_err() {
                error!(port = %self.name, "vhost-user port thread panicked");
            }
        } else {
            warn!(port = %self.name, "vhost-user port thread did not stop in time; leaving it");
            let _ = std::fs::remove_file(&self.socket);
        }
        info!(port = %self.name, "vhost-user port stopped");
    }
}

impl Drop for VmPortHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The listening socket; its file is removed when it is dropped.
struct SocketFile {
    listener: UnixListener,
    path: PathBuf,
}

impl SocketFile {
    fn bind(path: &Path) -> io::Result<Self> {
        // A stale socket from an earlier run would make bind fail.
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The port's thread: waits for a frontend, serves it until it goes away,
/// and starts over.
fn serve(io: Arc<PortIo>, shared: Arc<Shared>, socket: SocketFile) {
    let epoll = match Epoll::new().and_then(|ep| {
        ep.ctl(
            ControlOperation::Add,
            socket.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .map(|()| ep)
    }) {
        Ok(ep) => ep,
        Err(e) => {
            error!(port = %io.name, error = %e, "cannot wait for frontends; port is dead");
            return;
        }
    };
    let mut events = [EpollEvent::default(); 1];
    while !shared.stop.load(Ordering::Acquire) {
        match epoll.wait(IDLE_POLL.as_millis() as i32, &mut events) {
            Ok(0) => {
                // No frontend: what was queued for the guest is stale.
                io.drop_egress();
                continue;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!(port = %io.name, error = %e, "waiting for a frontend");
                std::thread::sleep(IDLE_POLL);
                continue;
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        match socket.listener.accept() {
            Ok((frontend, _)) => serve_one(&io, &shared, frontend),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn!(port = %io.name, error = %e, "accepting a frontend failed");
                std::thread::sleep(IDLE_POLL);
            }
        }
    }
    // Dropping `socket` removes the socket file.
}

/// A connected pair between the shim and the daemon. The daemon can only
/// take connections from a listener, so one is made for the moment in a
/// directory only this process can enter, and removed right away.
fn daemon_channel() -> io::Result<(Listener, UnixStream, PathBuf)> {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::os::unix::fs::DirBuilderExt;

    let nonce = RandomState::new().build_hasher().finish();
    let dir =
        std::env::temp_dir().join(format!("tandem-vhost-{}-{nonce:016x}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("backend.sock");
    let made = UnixListener::bind(&path).and_then(|l| Ok((l, UnixStream::connect(&path)?)));
    let _ = std::fs::remove_file(&path);
    match made {
        Ok((l, c)) => Ok((Listener::from(l), c, dir)),
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            Err(e)
        }
    }
}

/// Serves one frontend until it disconnects.
fn serve_one(io: &Arc<PortIo>, shared: &Shared, frontend: UnixStream) {
    run_conn(io, shared, frontend);
    // The connection's daemon is gone, its worker thread joined: reset the
    // exit event for the next connection's worker.
    let _ = io.exit_consumer.consume();
    io.drop_egress();
}

fn run_conn(io: &Arc<PortIo>, shared: &Shared, frontend: UnixStream) {
    if let Err(e) = frontend.set_nonblocking(false) {
        warn!(port = %io.name, error = %e, "cannot use the frontend's connection");
        return;
    }
    let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let conn = match Conn::new(io.clone(), mem.clone()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            error!(port = %io.name, error = %e, "cannot set up a connection");
            return;
        }
    };
    let mut daemon = match VhostUserDaemon::new(
        format!("vhost-user-{}", io.name),
        NetBackend(conn.clone()),
        mem,
    ) {
        Ok(d) => d,
        Err(e) => {
            error!(port = %io.name, error = %e, "cannot create the vhost-user daemon");
            return;
        }
    };
    {
        let handlers = daemon.get_epoll_handlers();
        let Some(worker) = handlers.first() else {
            error!(port = %io.name, "vhost-user daemon has no worker thread");
            return;
        };
        if let Err(e) = worker.register_listener(
            io.egress.notifier().as_raw_fd(),
            EventSet::IN,
            u64::from(EGRESS_EVENT),
        ) {
            error!(port = %io.name, error = %e, "cannot watch the egress queue");
            return;
        }
        let timer = lock(&io.throttle).as_raw_fd();
        if let Err(e) = worker.register_listener(timer, EventSet::IN, u64::from(THROTTLE_EVENT)) {
            error!(port = %io.name, error = %e, "cannot watch the shaping timer");
            return;
        }
    }
    let (mut listener, backend, dir) = match daemon_channel() {
        Ok(c) => c,
        Err(e) => {
            error!(port = %io.name, error = %e, "cannot connect the shim to the daemon");
            return;
        }
    };
    let started = daemon.start(&mut listener);
    drop(listener);
    let _ = std::fs::remove_dir(&dir);
    if let Err(e) = started {
        error!(port = %io.name, error = %e, "vhost-user daemon did not start");
        return;
    }
    let shims = match start_shims(&io.name, &frontend, &backend, conn.clone()) {
        Ok(s) => s,
        Err(e) => {
            error!(port = %io.name, error = %e, "cannot start the shim");
            daemon.request_shutdown();
            let _ = daemon.wait();
            return;
        }
    };

    let n = shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
    let stale = io.drop_egress();
    *lock(&shared.current) = Some(conn.clone());
    *lock(&shared.shutdown) = daemon.shutdown_handle();
    if shared.stop.load(Ordering::Acquire) {
        daemon.request_shutdown();
    }
    info!(port = %io.name, connection = n, dropped_stale = stale, "vhost-user frontend attached");
    match daemon.wait() {
        Ok(()) => info!(port = %io.name, "vhost-user frontend disconnected"),
        Err(e) => info!(port = %io.name, error = %e, "vhost-user frontend connection ended"),
    }
    lock(&shared.shutdown).take();
    lock(&shared.current).take();
    conn.running.store(false, Ordering::Release);
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
    for s in shims {
        let _ = s.join();
    }
    // Dropping the daemon stops its worker thread and unmaps guest memory.
    drop(daemon);
}

// ---------------------------------------------------------------------------
// The shim between QEMU and the daemon.
//
// QEMU's virtio-net sends VHOST_USER_SET_VRING_ENABLE when the device is
// reset or the guest acks its features, which is before the first
// VHOST_USER_SET_FEATURES (vhost_dev_start). The `vhost` crate (0.18)
// refuses SET_VRING_ENABLE until SET_FEATURES has acked
// VHOST_USER_F_PROTOCOL_FEATURES, and treats the refusal as fatal for the
// connection. The shim forwards every message unchanged (file descriptors
// included) and, before the first early SET_VRING_ENABLE, hands the daemon
// a SET_FEATURES carrying only that bit (no reply is asked for), so the
// enable is accepted and remembered; QEMU's own SET_FEATURES follows later
// and sets the real features.
// ---------------------------------------------------------------------------

const VHOST_USER_SET_FEATURES: u32 = 2;
const VHOST_USER_SET_VRING_ENABLE: u32 = 18;
const VHOST_USER_SET_VRING_KICK: u32 = 12;
/// Rings stopped at least this long before restarting mean a guest that
/// rebooted (announce it); shorter is a checkpoint's stop and start.
const ANNOUNCE_AFTER_PAUSE: Duration = Duration::from_millis(500);

/// The daemon handles a ring's enable asynchronously and nothing else
/// wakes its worker afterwards, so after a (re)start it would not look at
/// buffers made available before: poke its egress event until the rings
/// run (bounded: 100 pokes, 2 ms apart, on a short-lived thread).
fn wake_on_start(conn: &Arc<Conn>) {
    if conn.running.load(Ordering::Acquire) {
        return;
    }
    let conn = conn.clone();
    let _ = std::thread::Builder::new()
        .name("vhost-wake".into())
        .spawn(move || {
            for _ in 0..100 {
                let _ = conn.io.egress.notifier().write(1);
                std::thread::sleep(Duration::from_millis(2));
                if conn.running.load(Ordering::Acquire) {
                    let _ = conn.io.egress.notifier().write(1);
                    break;
                }
            }
        });
}
const VHOST_USER_HDR_LEN: usize = 12;
/// Generous bound on a message body (the `vhost` crate allows 4 KiB).
const SHIM_MAX_BODY: usize = 64 * 1024;
/// More descriptors than any message carries (SET_MEM_TABLE: 8).
const SHIM_MAX_FDS: usize = 32;

fn start_shims(
    name: &str,
    frontend: &UnixStream,
    backend: &UnixStream,
    conn: Arc<Conn>,
) -> io::Result<[JoinHandle<()>; 2]> {
    let to_backend = {
        let (from, to) = (frontend.try_clone()?, backend.try_clone()?);
        std::thread::Builder::new()
            .name(format!("vhost-shim-{name}"))
            .spawn(move || shim(from, to, true, Some(conn)))?
    };
    let to_frontend = {
        let (from, to) = (backend.try_clone()?, frontend.try_clone()?);
        match std::thread::Builder::new()
            .name(format!("vhost-shim-{name}"))
            .spawn(move || shim(from, to, false, None))
        {
            Ok(t) => t,
            Err(e) => {
                let _ = frontend.shutdown(Shutdown::Both);
                let _ = to_backend.join();
                return Err(e);
            }
        }
    };
    Ok([to_backend, to_frontend])
}

/// Forwards vhost-user messages (with their file descriptors) from `from`
/// to `to` until either side closes, then closes both. `requests`: this is
/// the frontend → daemon direction, where an early `SET_VRING_ENABLE` gets
/// a `SET_FEATURES(PROTOCOL_FEATURES)` slipped in front of it. With `conn`,
/// the worker is woken after a ring is enabled or given a kick descriptor
/// until it sees the rings running (see [`wake_on_start`]).
fn shim(from: UnixStream, to: UnixStream, requests: bool, conn: Option<Arc<Conn>>) {
    let mut features_acked = false;
    let mut msg = Vec::with_capacity(VHOST_USER_HDR_LEN + 256);
    let mut fds = Vec::new();
    loop {
        msg.clear();
        msg.resize(VHOST_USER_HDR_LEN, 0);
        fds.clear();
        match recv_exact(&from, &mut msg, &mut fds) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                debug!(error = %e, "vhost-user shim: receive failed");
                break;
            }
        }
        let word = |i: usize| u32::from_le_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
        let (request, size) = (word(0), word(8) as usize);
        if size > SHIM_MAX_BODY {
            warn!(
                request,
                size, "vhost-user message too large; closing the connection"
            );
            break;
        }
        msg.resize(VHOST_USER_HDR_LEN + size, 0);
        if size > 0
            && !matches!(
                recv_exact(&from, &mut msg[VHOST_USER_HDR_LEN..], &mut fds),
                Ok(true)
            )
        {
            break;
        }
        if requests {
            if request == VHOST_USER_SET_FEATURES {
                features_acked = true;
            } else if request == VHOST_USER_SET_VRING_ENABLE && !features_acked {
                features_acked = true;
                let mut pre = Vec::with_capacity(VHOST_USER_HDR_LEN + 8);
                pre.extend_from_slice(&VHOST_USER_SET_FEATURES.to_le_bytes());
                pre.extend_from_slice(&1u32.to_le_bytes()); // version 1, no reply wanted
                pre.extend_from_slice(&8u32.to_le_bytes());
                pre.extend_from_slice(
                    &VhostUserVirtioFeatures::PROTOCOL_FEATURES
                        .bits()
                        .to_le_bytes(),
                );
                if send_all(&to, &pre, &[]).is_err() {
                    break;
                }
            }
        }
        if let Err(e) = send_all(&to, &msg, &fds) {
            debug!(error = %e, "vhost-user shim: send failed");
            break;
        }
        if let Some(conn) = &conn {
            if request == VHOST_USER_SET_VRING_ENABLE || request == VHOST_USER_SET_VRING_KICK {
                wake_on_start(conn);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Fills `buf` from the socket, keeping the descriptors that arrive with
/// it. `Ok(false)`: the peer closed before the first byte.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<File>) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut raw: [RawFd; SHIM_MAX_FDS] = [-1; SHIM_MAX_FDS];
        // SAFETY: the only iovec describes `rest`, a live buffer borrowed
        // mutably for the whole call and exactly `iov_len` bytes long.
        let got = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
        let (n, nfds) = match got {
            Ok(r) => r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(e.into()),
        };
        for &fd in raw.iter().take(nfds) {
            // SAFETY: recvmsg just installed `fd` in this process for us;
            // nothing else owns it, so the File becomes its only owner.
            fds.push(unsafe { File::from_raw_fd(fd) });
        }
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(true)
}

/// Sends `data` with `fds` attached to its first byte.
fn send_all(sock: &UnixStream, data: &[u8], fds: &[File]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    let mut attach: &[RawFd] = &raw;
    while sent < data.len() {
        match sock.send_with_fds(&[&data[sent..]], attach) {
            Ok(n) => {
                sent += n;
                attach = &[];
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// A driver-side model of one split virtqueue, for tests and fuzzing.
// ---------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

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
    fn features_offered() {
        let f = OFFERED_FEATURES;
        for bit in [32, 15, 29, 28, 21, 30, 26] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        // Checksum and TCP segmentation offload both ways.
        for bit in [0, 1, 7, 8, 11, 12] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        // Not: legacy GSO, GUEST_ECN, GUEST_UFO, HOST_ECN, HOST_UFO, MQ,
        // CTRL_VQ (QEMU's own).
        for bit in [6, 9, 10, 13, 14, 17, 22] {
            assert_eq!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(
            tx_offloads(f),
            TxOffloads {
                csum: true,
                tso4: true,
                tso6: true
            }
        );
        assert_eq!(
            rx_offloads(f),
            RxOffloads {
                csum: true,
                tso4: true,
                tso6: true
            }
        );
        // Segmentation is meaningless without checksum offload.
        let no_csum = f & !(1 << VIRTIO_NET_F_CSUM) & !(1 << VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(tx_offloads(no_csum), TxOffloads::default());
        assert_eq!(rx_offloads(no_csum), RxOffloads::default());
        let p = offered_protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        assert!(!p.contains(VhostUserProtocolFeatures::RARP));
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

    #[test]
    fn exit_event_fd_is_not_closed_by_the_library() {
        let (exit_consumer, exit_notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).unwrap();
        let io = Arc::new(PortIo {
            id: 7,
            name: "t".into(),
            egress: Arc::new(EgressQueue::new(4, 8192).unwrap()),
            counters: Arc::new(PortCounters::default()),
            ingress: Arc::new(Recorder::default()),
            on_connect: None,
            exit_consumer,
            exit_notifier,
            throttle: Mutex::new(TimerFd::new().unwrap()),
            write_log: Mutex::new(None),
        });
        for _ in 0..3 {
            let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let conn = Arc::new(Conn::new(io.clone(), mem.clone()).unwrap());
            let daemon = VhostUserDaemon::new("t".into(), NetBackend(conn), mem).unwrap();
            // Dropping it notifies the exit event and joins the worker.
            drop(daemon);
            io.exit_consumer
                .consume()
                .expect("the port's exit eventfd is open and was notified");
            let again = io.exit_consumer.consume().unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
        }
    }

    fn vu_msg(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    fn read_msg(sock: &UnixStream) -> (Vec<u8>, usize) {
        let mut hdr = vec![0u8; VHOST_USER_HDR_LEN];
        let mut fds = Vec::new();
        assert!(recv_exact(sock, &mut hdr, &mut fds).unwrap());
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        let mut body = vec![0u8; size];
        if size > 0 {
            assert!(recv_exact(sock, &mut body, &mut fds).unwrap());
        }
        hdr.extend(body);
        (hdr, fds.len())
    }

    #[test]
    fn shim_acks_protocol_features_before_an_early_vring_enable() {
        let (qemu, shim_in) = UnixStream::pair().unwrap();
        let (shim_out, daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || shim(shim_in, shim_out, true, None));
        let kick = vu_msg(12, 1, &0u64.to_le_bytes());
        let enable = vu_msg(VHOST_USER_SET_VRING_ENABLE, 9, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let features = vu_msg(
            VHOST_USER_SET_FEATURES,
            1,
            &(1u64 << 32 | 1 << 30).to_le_bytes(),
        );
        send_all(&qemu, &kick, &[File::open("/dev/null").unwrap()]).unwrap();
        send_all(&qemu, &enable, &[]).unwrap();
        send_all(&qemu, &enable, &[]).unwrap();
        send_all(&qemu, &features, &[]).unwrap();
        send_all(&qemu, &enable, &[]).unwrap();
        assert_eq!(read_msg(&daemon), (kick, 1), "descriptor forwarded");
        let pre = vu_msg(
            VHOST_USER_SET_FEATURES,
            1,
            &VhostUserVirtioFeatures::PROTOCOL_FEATURES
                .bits()
                .to_le_bytes(),
        );
        assert_eq!(read_msg(&daemon), (pre, 0));
        assert_eq!(read_msg(&daemon), (enable.clone(), 0));
        assert_eq!(
            read_msg(&daemon),
            (enable.clone(), 0),
            "only one synthetic message"
        );
        assert_eq!(read_msg(&daemon), (features, 0));
        assert_eq!(read_msg(&daemon), (enable, 0));
        drop(qemu);
        t.join().unwrap();
        let mut fds = Vec::new();
        assert!(
            !recv_exact(&daemon, &mut [0u8; 4], &mut fds).unwrap(),
            "EOF passed on"
        );
    }

    #[test]
    fn shim_refuses_oversized_messages() {
        let (qemu, shim_in) = UnixStream::pair().unwrap();
        let (shim_out, daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || shim(shim_in, shim_out, true, None));
        let mut hdr = vu_msg(5, 1, &[]);
        hdr[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        send_all(&qemu, &hdr, &[]).unwrap();
        t.join().unwrap();
        let mut fds = Vec::new();
        assert!(!recv_exact(&daemon, &mut [0u8; 4], &mut fds).unwrap());
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

        #[test]
        fn fuzz_tx_never_panics(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            fuzz_tx_chain(&data);
        }

        #[test]
        fn fuzz_rx_never_panics(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            fuzz_rx_chain(&data);
        }
    }
}
