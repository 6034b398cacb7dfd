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
//!   [`Ingress::ingress`](crate::port::Ingress::ingress). Malformed or
//!   hostile chains are dropped and counted but still returned to the guest
//!   (used length 0), so a buggy or hostile guest can stall neither itself
//!   nor the port. One run takes at most [`TX_BUDGET`] chains; the port's
//!   worker then serves its other events and comes back for the rest by
//!   itself.
//! - RX: frames from the port's [`EgressQueue`](crate::port::EgressQueue)
//!   are written, behind a zeroed header, into the guest's write-only
//!   buffers (several buffers per frame when `VIRTIO_NET_F_MRG_RXBUF` is
//!   negotiated). When the guest has no buffer posted the frame is put back
//!   and the port waits for the guest's next RX kick.
//!
//! # Lifecycle
//!
//! `vhost-user-backend` 0.24 binds one set of vrings, one guest-memory map
//! and one worker thread to a
//! [`VhostUserDaemon`](vhost_user_backend::VhostUserDaemon), and its
//! request handler keeps per-connection state (owner claimed, features,
//! ring addresses) that is never reset when the frontend goes away. A
//! second QEMU on the same daemon would therefore be refused at
//! `SET_OWNER`. So the port builds a fresh daemon (and fresh per-connection
//! state) for every frontend connection, on a listening socket that lives
//! for the whole life of the port: after a disconnect (guest shutdown, QEMU
//! crash or kill) the old daemon is dropped — which stops its worker thread
//! and unmaps the old guest memory — and the port waits for the next QEMU
//! on the same socket. A guest reboot keeps the connection: QEMU stops and
//! restarts the rings.
//!
//! The port accepts QEMU's connection itself and puts a small message shim
//! between QEMU and the daemon (the `relay` module): QEMU's virtio-net
//! sends `SET_VRING_ENABLE` before its first `SET_FEATURES`, which the
//! `vhost` crate 0.18 rejects by dropping the connection. The shim forwards
//! every message unchanged and slips a `SET_FEATURES(PROTOCOL_FEATURES)` in
//! front of the first early enable.
//!
//! # Migration and RARP
//!
//! Dirty-page logging is offered (`VHOST_F_LOG_ALL` + protocol
//! `LOG_SHMFD`): guest memory is mapped with
//! [`BitmapMmapRegion`], so every write this backend makes into guest RAM
//! (frames, headers, used-ring entries) is recorded in the log QEMU hands
//! over with `SET_LOG_BASE`, and QEMU can live-migrate a VM with this NIC.
//!
//! # Postcopy
//!
//! `PAGEFAULT` is offered, and the `vhost-user-backend` crate's `postcopy`
//! feature handles `POSTCOPY_ADVISE` (a userfaultfd handed to QEMU),
//! `POSTCOPY_LISTEN` (the backend's own mapping of guest RAM registered
//! with it, regions mapped later too) and `POSTCOPY_END`. On the
//! destination, while the guest already runs there, a worker that touches
//! a page not yet arrived blocks in the fault until QEMU has fetched the
//! page from the source and woken it. Without `PAGEFAULT` QEMU refuses
//! the postcopy capability for any VM with a switch NIC ("vhost-user
//! backend not capable of postcopy").
//!
//! `VHOST_USER_SEND_RARP` cannot be handled: the `vhost` crate (0.18) has
//! no handler for it and answers it by dropping the whole connection. The
//! `RARP` protocol feature is therefore *not* offered. Instead
//! `VIRTIO_NET_F_GUEST_ANNOUNCE` is offered, so after a migration QEMU asks
//! the guest to announce itself, and the optional connect hook (see
//! [`VmPortHandle::spawn_with_hook`]) runs whenever the guest's rings start
//! on this port, which is when a switch should re-learn the VM's MAC and
//! announce it on the VM's behalf.
//!
//! # Layout
//!
//! - `ring`: the data path on the split virtqueues, generic over the guest
//!   memory (header rules, chain checks, TX and RX processing);
//! - `backend`: the `VhostUserBackend` of one frontend connection;
//! - `port`: the listening socket and the thread serving one frontend at a
//!   time ([`VmPortHandle`]);
//! - `relay`: the vhost-user message shim between QEMU and the daemon;
//! - `sim`: a driver-side model of a virtqueue and the fuzz entry points
//!   (only with `cfg(test)`, `cfg(fuzzing)` or the `fault-injection`
//!   feature).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VringRwLock;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

mod backend;
mod port;
mod relay;
mod ring;
#[cfg(any(test, fuzzing, feature = "fault-injection"))]
mod sim;

pub use port::{VmPortConfig, VmPortHandle};
pub use ring::{
    net_hdr_len, process_rx, process_tx, rx_header, rx_offloads, strip_tx_header, tx_offloads,
    vring_need_event, ChainCheck, NetPath, QueueRun, RingError, TX_BUDGET,
};
#[cfg(any(test, fuzzing, feature = "fault-injection"))]
pub use sim::{fuzz_rx_chain, fuzz_tx_chain, SimRing};

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
/// Epoll event id of the TX re-arm: a TX run stopped at its budget.
const TX_MORE_EVENT: u16 = NUM_QUEUES as u16 + 3;
/// Largest ring size the frontend may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Longest descriptor chain accepted (indirect tables included). Linux
/// needs at most MAX_SKB_FRAGS + 2 = 19 for a frame without offloads.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// `struct virtio_net_hdr_v1` (with `num_buffers`): VERSION_1 or MRG_RXBUF.
pub const NET_HDR_LEN: usize = 12;
/// The legacy `struct virtio_net_hdr` without `num_buffers`.
pub const LEGACY_NET_HDR_LEN: usize = 10;

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
/// `PAGEFAULT`: postcopy (see "Postcopy" in the module docs).
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::PAGEFAULT
}

/// Called (in the port's worker thread) each time a guest's rings start on
/// the port: a new frontend, a guest reboot, an incoming migration.
pub type ConnectHook = Box<dyn Fn() + Send + Sync>;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
type Vring = VringRwLock<Mem>;

/// Rings stopped at least this long before restarting mean a guest that
/// rebooted (announce it); shorter is a checkpoint's stop and start.
const ANNOUNCE_AFTER_PAUSE: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{RxOffloads, TxOffloads};

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
        assert!(p.contains(VhostUserProtocolFeatures::PAGEFAULT));
        assert!(!p.contains(VhostUserProtocolFeatures::RARP));
    }
}
