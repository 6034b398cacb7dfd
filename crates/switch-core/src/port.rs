//! The contract between the forwarding core and a port's I/O thread.
//!
//! Every port (VM, uplink, host) owns an [`EgressQueue`]: the core pushes
//! frames that must leave through the port, the port's I/O thread pops them
//! and writes them out (into guest RX buffers, an AF_PACKET socket, a tap).
//! The queue is bounded so that a port whose consumer stalls (a guest that
//! posts no RX buffers, a dead QEMU) only drops its own frames and never
//! blocks the sender or the other ports.
//!
//! In the other direction a port hands every frame it receives to an
//! [`Ingress`] (the switch), synchronously, in its own thread.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::offload::{self, Offload, RxOffloads};

/// Index of a port inside one switch instance. Output commit's gate keeps
/// held frames by it, so it is that crate's type.
pub use tandem_outcommit::PortId;

/// Largest Ethernet frame a port accepts or emits, without FCS: 1500 bytes
/// of payload, 14 of header and two 802.1Q tags. Anything larger is
/// dropped as `malformed`.
pub const MAX_FRAME: usize = 1522;
/// Smallest frame that carries an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// Why a frame was dropped; each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than an Ethernet header or longer than [`MAX_FRAME`].
    Malformed,
    /// A guest descriptor chain that was too long, looped, pointed outside
    /// guest memory or had the wrong direction.
    BadDescriptor,
    /// The egress queue was full (the consumer is slow or stalled).
    QueueFull,
    /// Not allowed by the port group's VLAN policy.
    Vlan,
    /// Over the shaping policy.
    Shaped,
    /// Source MAC not the port's own, with MAC changes forbidden.
    Security,
    /// The MAC table limit for the port was reached for a new source.
    LearnLimit,
    /// The per-frame gate said drop.
    Gate,
    /// The guest posted no RX buffer in time, or the port is down.
    NoBuffer,
    /// The port's group is blocked: it forwards nothing either way.
    Blocked,
    /// Larger than the port's MTU (an uplink's or host port's `mtu`).
    Mtu,
    /// A DHCP server message (offer, ack, nak, lease-query reply) from a
    /// port DHCP snooping does not trust: a rogue server in a VM.
    DhcpServer,
    /// IP source guard: an IPv4 packet or ARP claim from an address the
    /// VM holds no DHCP binding for.
    SourceGuard,
}

/// Per-port counters. All relaxed atomics: they are statistics, read while
/// the data path runs.
#[derive(Debug, Default)]
pub struct PortCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub drop_malformed: AtomicU64,
    pub drop_bad_descriptor: AtomicU64,
    pub drop_queue_full: AtomicU64,
    pub drop_vlan: AtomicU64,
    pub drop_shaped: AtomicU64,
    pub drop_security: AtomicU64,
    pub drop_learn_limit: AtomicU64,
    pub drop_gate: AtomicU64,
    pub drop_no_buffer: AtomicU64,
    pub drop_blocked: AtomicU64,
    pub drop_mtu: AtomicU64,
    pub drop_dhcp_server: AtomicU64,
    pub drop_source_guard: AtomicU64,
}

/// A point-in-time copy of [`PortCounters`]. `rx` is what the port received
/// from its peer (the guest's transmissions for a VM port); `tx` is what it
/// delivered to its peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CounterSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub drops: DropSnapshot,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DropSnapshot {
    pub malformed: u64,
    pub bad_descriptor: u64,
    pub queue_full: u64,
    pub vlan: u64,
    pub shaped: u64,
    pub security: u64,
    pub learn_limit: u64,
    pub gate: u64,
    pub no_buffer: u64,
    // Defaults: a snapshot from a tandemd older than these reasons parses.
    #[serde(default)]
    pub blocked: u64,
    #[serde(default)]
    pub mtu: u64,
    #[serde(default)]
    pub dhcp_server: u64,
    #[serde(default)]
    pub source_guard: u64,
}

impl DropSnapshot {
    /// Drops for every reason, by the name `switch stats` prints.
    pub fn by_reason(&self) -> [(&'static str, u64); 13] {
        [
            ("malformed", self.malformed),
            ("bad-descriptor", self.bad_descriptor),
            ("queue-full", self.queue_full),
            ("vlan", self.vlan),
            ("shaped", self.shaped),
            ("security", self.security),
            ("learn-limit", self.learn_limit),
            ("gate", self.gate),
            ("no-buffer", self.no_buffer),
            ("blocked", self.blocked),
            ("mtu", self.mtu),
            ("dhcp-server", self.dhcp_server),
            ("source-guard", self.source_guard),
        ]
    }

    /// Drops for every reason together.
    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }
}

impl PortCounters {
    pub fn dropped(&self, why: DropReason) {
        let c = match why {
            DropReason::Malformed => &self.drop_malformed,
            DropReason::BadDescriptor => &self.drop_bad_descriptor,
            DropReason::QueueFull => &self.drop_queue_full,
            DropReason::Vlan => &self.drop_vlan,
            DropReason::Shaped => &self.drop_shaped,
            DropReason::Security => &self.drop_security,
            DropReason::LearnLimit => &self.drop_learn_limit,
            DropReason::Gate => &self.drop_gate,
            DropReason::NoBuffer => &self.drop_no_buffer,
            DropReason::Blocked => &self.drop_blocked,
            DropReason::Mtu => &self.drop_mtu,
            DropReason::DhcpServer => &self.drop_dhcp_server,
            DropReason::SourceGuard => &self.drop_source_guard,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn received(&self, bytes: usize) {
        self.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn transmitted(&self, bytes: usize) {
        self.tx_frames.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            rx_frames: g(&self.rx_frames),
            rx_bytes: g(&self.rx_bytes),
            tx_frames: g(&self.tx_frames),
            tx_bytes: g(&self.tx_bytes),
            drops: DropSnapshot {
                malformed: g(&self.drop_malformed),
                bad_descriptor: g(&self.drop_bad_descriptor),
                queue_full: g(&self.drop_queue_full),
                vlan: g(&self.drop_vlan),
                shaped: g(&self.drop_shaped),
                security: g(&self.drop_security),
                learn_limit: g(&self.drop_learn_limit),
                gate: g(&self.drop_gate),
                no_buffer: g(&self.drop_no_buffer),
                blocked: g(&self.drop_blocked),
                mtu: g(&self.drop_mtu),
                dhcp_server: g(&self.drop_dhcp_server),
                source_guard: g(&self.drop_source_guard),
            },
        }
    }
}

/// Receives every frame a port takes in from its peer. Implemented by the
/// switch; called in the port's own I/O thread. The frame is a plain
/// Ethernet frame (no virtio-net header, no FCS), tags included.
pub trait Ingress: Send + Sync {
    fn ingress(&self, port: PortId, frame: &[u8]);

    /// A packet that still needs checksum or segmentation work (see
    /// [`crate::offload`]); `off` was validated against `frame`. The
    /// default finishes it in software and hands over the plain frames.
    fn ingress_offloaded(&self, port: PortId, frame: &[u8], off: Offload) {
        let mut plain = Vec::new();
        if offload::finish(frame.to_vec(), &off, &mut plain).is_ok() {
            for f in &plain {
                self.ingress(port, f);
            }
        }
    }

    /// Shaping for a sender that can wait (a guest's TX ring): may the
    /// port's next frame of `bytes` go now? If not, how long until it may.
    /// A frame allowed here is charged; [`Ingress::ingress`] does not police
    /// it again.
    fn reserve_tx(
        &self,
        _port: PortId,
        _bytes: usize,
        _now: std::time::Instant,
    ) -> Result<(), std::time::Duration> {
        Ok(())
    }

    /// An uplink's traffic now leaves through another member (or through
    /// one again after none was up): the network beyond has learned the
    /// VMs' addresses behind the old one.
    fn uplink_active_changed(&self, _port: PortId) {}
}

/// A frame on its way out of a port, with the offload work it still needs
/// ([`Offload::NONE`] for a plain Ethernet frame). Only ports that accept
/// offloads ([`EgressQueue::accepts`]) are given packets that need work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub frame: Vec<u8>,
    pub offload: Offload,
}

impl Packet {
    pub fn plain(frame: Vec<u8>) -> Packet {
        Packet {
            frame,
            offload: Offload::NONE,
        }
    }
}

/// Bounded queue of frames waiting to leave one port.
pub struct EgressQueue {
    frames: Mutex<Queued>,
    max_frames: usize,
    max_bytes: usize,
    /// Written whenever a frame is queued; the port's I/O thread polls it.
    notify: EventFd,
    /// What the consumer takes with offload work left to do (a VM port
    /// whose guest negotiated it); packed as csum | tso4 << 1 | tso6 << 2.
    accepts: AtomicU64,
}

#[derive(Default)]
struct Queued {
    q: VecDeque<Packet>,
    bytes: usize,
}

impl EgressQueue {
    pub fn new(max_frames: usize, max_bytes: usize) -> std::io::Result<Self> {
        Ok(Self {
            frames: Mutex::new(Queued::default()),
            max_frames,
            max_bytes,
            notify: EventFd::new(EFD_NONBLOCK)?,
            accepts: AtomicU64::new(0),
        })
    }

    /// The consumer says which offloaded packets it takes from now on.
    pub fn set_accepts(&self, rx: RxOffloads) {
        let bits = u64::from(rx.csum) | u64::from(rx.tso4) << 1 | u64::from(rx.tso6) << 2;
        self.accepts.store(bits, Ordering::Relaxed);
    }

    /// Which offloaded packets the consumer takes (none for uplinks and
    /// host ports, and for a VM port before its guest negotiated them).
    pub fn accepts(&self) -> RxOffloads {
        let bits = self.accepts.load(Ordering::Relaxed);
        RxOffloads {
            csum: bits & 1 != 0,
            tso4: bits & 2 != 0,
            tso6: bits & 4 != 0,
        }
    }

    /// Queues a plain frame; `false` if the queue is full (the caller
    /// counts the drop against this port).
    pub fn push(&self, frame: Vec<u8>) -> bool {
        self.push_packet(Packet::plain(frame))
    }

    /// Queues a packet; `false` if the queue is full.
    ///
    /// The consumer is woken only when the queue goes from empty to not
    /// empty: it drains the notifier before popping and pops until the
    /// queue is empty (or until its peer cannot take more, when it waits
    /// for the peer instead), so a frame added to a non-empty queue is
    /// always seen. One eventfd write per burst instead of per frame is
    /// what keeps a busy port from waking its consumer for every frame.
    pub fn push_packet(&self, packet: Packet) -> bool {
        let was_empty = {
            let mut g = self.frames.lock();
            let len = packet.frame.len();
            if g.q.len() >= self.max_frames || g.bytes + len > self.max_bytes {
                return false;
            }
            g.bytes += len;
            g.q.push_back(packet);
            g.q.len() == 1
        };
        if was_empty {
            let _ = self.notify.write(1);
        }
        true
    }

    /// Queues a packet, making room by dropping the oldest when full:
    /// for a port whose consumer has not started yet, where the newest
    /// frames matter most. Returns how many were dropped.
    pub fn push_packet_evicting(&self, packet: Packet) -> usize {
        let len = packet.frame.len();
        if len > self.max_bytes || self.max_frames == 0 {
            return 1;
        }
        let (was_empty, evicted) = {
            let mut g = self.frames.lock();
            let mut evicted = 0;
            while g.q.len() >= self.max_frames || g.bytes + len > self.max_bytes {
                let Some(old) = g.q.pop_front() else { break };
                g.bytes -= old.frame.len();
                evicted += 1;
            }
            g.bytes += len;
            g.q.push_back(packet);
            (g.q.len() == 1, evicted)
        };
        if was_empty {
            let _ = self.notify.write(1);
        }
        evicted
    }

    /// Takes the oldest packet.
    pub fn pop(&self) -> Option<Packet> {
        let mut g = self.frames.lock();
        let f = g.q.pop_front()?;
        g.bytes -= f.frame.len();
        Some(f)
    }

    /// Puts a packet back at the head, after a pop whose frame could not be
    /// delivered yet (no RX buffer available). Never fails: the frame was
    /// already accounted for.
    pub fn unpop(&self, packet: Packet) {
        let mut g = self.frames.lock();
        g.bytes += packet.frame.len();
        g.q.push_front(packet);
    }

    pub fn len(&self) -> usize {
        self.frames.lock().q.len()
    }

    /// The most frames it holds.
    pub fn capacity(&self) -> usize {
        self.max_frames
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops everything queued (the port went down); returns how many.
    pub fn clear(&self) -> usize {
        let mut g = self.frames.lock();
        let n = g.q.len();
        g.q.clear();
        g.bytes = 0;
        n
    }

    /// The eventfd that becomes readable when frames are queued. Readers
    /// must drain it (read) before popping, so no wake-up is lost.
    pub fn notifier(&self) -> &EventFd {
        &self.notify
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_frames_and_bytes() {
        let q = EgressQueue::new(2, 3000).unwrap();
        assert!(q.push(vec![0; 1000]));
        assert!(q.push(vec![0; 1000]));
        assert!(!q.push(vec![0; 10]), "frame limit");
        let f = q.pop().unwrap();
        assert!(!q.push(vec![0; 2001]), "byte limit");
        q.unpop(f);
        assert_eq!(q.len(), 2);
        assert_eq!(q.clear(), 2);
        assert!(q.is_empty());
    }
}
