//! The per-frame paths: what a port hands in ([`Ingress`]), the policy it
//! passes, the gate, and forwarding to the ports that should see a frame.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_outcommit::GateDecision;

use super::{snoop, untagged, FrameGate, Port, PortKind, Switch};
use crate::fdb::Learned;
use crate::frame;
use crate::offload::{self, Offload};
use crate::port::{DropReason, Ingress, Packet, PortId, MIN_FRAME};

impl Switch {
    /// Sends `inner` (untagged, classified into `vlan`) to every port that
    /// should see it. A packet with offload work left goes whole to the
    /// ports that accept it and as finished plain frames to the others.
    pub(super) fn forward(
        &self,
        from: PortId,
        src_port: &Port,
        vlan: u16,
        inner: Packet,
        now: Instant,
    ) {
        let Some(info) = frame::parse(&inner.frame) else {
            return;
        };
        let inner = if !info.dst.is_group() && self.pending_moves.load(Ordering::Acquire) > 0 {
            match self.hold_for_move(info.dst, vlan, inner) {
                Some(inner) => inner,
                None => return,
            }
        } else {
            inner
        };
        let known = if info.dst.is_group() {
            None
        } else {
            self.fdb.lock().lookup(vlan, info.dst, now)
        };
        if known == Some(from) {
            return; // no hairpin: the destination is behind the sender's port
        }
        // IGMP snooping: multicast to a group reaches the ports of
        // snooping groups only where they joined it (routers get all).
        // A host's report or leave from a snooping port goes to the
        // router ports only (RFC 4541 2.1.1).
        let members = if info.dst.is_group() && self.any_igmp.load(Ordering::Acquire) {
            if src_port.group().is_some_and(|g| g.igmp_snooping)
                && snoop::is_igmp_membership(&inner.frame)
            {
                Some(self.snoop.lock().router_ports(vlan, now))
            } else {
                snoop::confinable_group(&inner.frame)
                    .and_then(|group| self.snoop.lock().multicast_targets(vlan, group, now))
            }
        } else {
            None
        };
        let ports = self.ports.read();
        let mut targets: Vec<(&Port, bool)> = Vec::new();
        for (&id, p) in ports.iter() {
            if id == from {
                continue;
            }
            let Some(g) = p.group() else { continue };
            let Some(tag) = g.egress_tagging(vlan) else {
                continue;
            };
            let wanted = match known {
                Some(dst) => dst == id || g.allow_promiscuous,
                None => {
                    // Unknown unicast is not flooded to a VM port that
                    // cannot own the address (its MAC is fixed and not the
                    // destination), unless it asked to see everything.
                    info.dst.is_group()
                        || g.allow_promiscuous
                        || g.allow_mac_change
                        || p.mac.is_none()
                        || p.mac == Some(info.dst)
                }
            };
            if let Some(m) = &members {
                if g.igmp_snooping && !m.contains(&id) {
                    continue;
                }
            }
            if wanted
                && (p.up.load(Ordering::Relaxed)
                    || p.departing.load(Ordering::Relaxed)
                    || p.arriving.load(Ordering::Relaxed))
            {
                if g.blocked {
                    p.counters.dropped(DropReason::Blocked);
                    continue;
                }
                targets.push((p.as_ref(), tag));
            }
        }
        // Computed once, for the first port that needs it.
        let mut tagged: Option<Vec<u8>> = None;
        let mut finished: Option<Vec<Vec<u8>>> = None;
        let mut inner = Some(inner);
        let count = targets.len();
        for (i, (p, tag)) in targets.into_iter().enumerate() {
            let Some(packet) = inner.as_ref() else { break };
            let offload = packet.offload;
            if offload.is_none() || (p.egress.accepts().accepts(&offload) && !p.shaped_out()) {
                let out = if tag {
                    tagged
                        .get_or_insert_with(|| frame::push_tag(&packet.frame, vlan))
                        .clone()
                } else if i + 1 == count {
                    // The last (usually the only) destination takes the
                    // frame itself instead of a copy.
                    inner.take().map(|p| p.frame).unwrap_or_default()
                } else {
                    packet.frame.clone()
                };
                p.send(
                    Packet {
                        frame: out,
                        offload,
                    },
                    now,
                );
                continue;
            }
            let plain = finished.get_or_insert_with(|| {
                let mut out = Vec::new();
                if offload::finish(packet.frame.clone(), &offload, &mut out).is_err() {
                    src_port.counters.dropped(DropReason::Malformed);
                    out.clear();
                }
                out
            });
            for f in plain.iter() {
                let out = if tag {
                    frame::push_tag(f, vlan)
                } else {
                    f.clone()
                };
                p.send(Packet::plain(out), now);
            }
        }
    }
}

impl Port {
    pub(super) fn is_vm(&self) -> bool {
        matches!(self.kind, PortKind::Vm { .. })
    }

    fn shaped_out(&self) -> bool {
        self.has_shaper_out.load(Ordering::Acquire)
    }

    /// Whether `packet` fits the port's MTU, once segmented if it is a
    /// TSO packet; a port without an MTU of its own takes anything the
    /// switch carries.
    fn fits_mtu(&self, frame: &[u8], off: &Offload) -> bool {
        let mtu = self.mtu.load(Ordering::Relaxed) as usize;
        if mtu == 0 {
            return true;
        }
        // Cheap test first: most frames are well under any MTU.
        if frame.len() <= mtu + frame::ETH_HDR {
            return true;
        }
        l3_len(frame, off) <= mtu
    }

    /// Shapes and queues one packet leaving this port.
    pub(super) fn send(&self, packet: Packet, now: Instant) {
        if !self.fits_mtu(&packet.frame, &packet.offload) {
            self.counters.dropped(DropReason::Mtu);
            return;
        }
        if self.shaped_out() {
            if let Some(b) = self.shaper_out.lock().as_mut() {
                if !b.admit(packet.frame.len(), now) {
                    self.counters.dropped(DropReason::Shaped);
                    return;
                }
            }
        }
        if self.arriving.load(Ordering::Relaxed) && !self.up.load(Ordering::Relaxed) {
            for _ in 0..self.egress.push_packet_evicting(packet) {
                self.counters.dropped(DropReason::QueueFull);
            }
        } else if !self.egress.push_packet(packet) {
            self.counters.dropped(DropReason::QueueFull);
        }
    }
}

impl Ingress for Switch {
    fn ingress(&self, id: PortId, frame: &[u8]) {
        self.ingress_offloaded(id, frame, Offload::NONE);
    }

    fn reserve_tx(&self, port: PortId, bytes: usize, now: Instant) -> Result<(), Duration> {
        if !self.any_shaper_in.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(p) = self.port(port) else {
            return Ok(());
        };
        if !p.has_shaper_in.load(Ordering::Acquire) {
            return Ok(());
        }
        let result = match p.shaper_in.lock().as_mut() {
            Some(b) => b.reserve(bytes, now),
            None => Ok(()),
        };
        result
    }

    fn uplink_active_changed(&self, port: PortId) {
        let n = self.announce_on(port);
        tracing::info!(port, vms = n, "uplink member changed; VMs announced on it");
    }

    fn ingress_offloaded(&self, id: PortId, frame: &[u8], off: Offload) {
        let Some(p) = self.port(id) else { return };
        if !off.is_none() && self.gate(id).is_some() {
            // The gate reads and rewrites finished TCP segments (its ACK
            // clamp adjusts checksums incrementally): it sees what would
            // have gone on the wire.
            let mut plain = Vec::new();
            if offload::finish(frame.to_vec(), &off, &mut plain).is_err() {
                p.counters.dropped(DropReason::Malformed);
                return;
            }
            for f in &plain {
                self.ingress_offloaded(id, f, Offload::NONE);
            }
            return;
        }
        let now = Instant::now();
        if frame.len() < MIN_FRAME || frame.len() > off.max_frame() {
            p.counters.dropped(DropReason::Malformed);
            return;
        }
        let Some(info) = frame::parse(frame) else {
            p.counters.dropped(DropReason::Malformed);
            return;
        };
        let Some(g) = p.group() else {
            p.counters.dropped(DropReason::Vlan);
            return;
        };
        if g.blocked {
            p.counters.dropped(DropReason::Blocked);
            return;
        }
        // The kernel keeps a port's own interface within its MTU; this
        // holds the switch to it whatever the device let through.
        if !p.fits_mtu(frame, &off) {
            p.counters.dropped(DropReason::Mtu);
            return;
        }
        // A VM port's guest was shaped before its frame was taken from
        // the ring (`reserve_tx`); other senders can only be policed.
        if !p.is_vm() {
            if let Some(b) = p.shaper_in.lock().as_mut() {
                if !b.admit(frame.len(), now) {
                    p.counters.dropped(DropReason::Shaped);
                    return;
                }
            }
        }
        if let Some(mac) = p.mac {
            if !g.allow_mac_change && info.src != mac {
                p.counters.dropped(DropReason::Security);
                return;
            }
        }
        let Some(vlan) = g.classify(info.vid) else {
            p.counters.dropped(DropReason::Vlan);
            return;
        };
        if info.src.is_group() {
            p.counters.dropped(DropReason::Malformed);
            return;
        }
        let learned = self
            .fdb
            .lock()
            .learn(vlan, info.src, id, g.learn_limit, now);
        match learned {
            Learned::PortLimit => {
                p.counters.dropped(DropReason::LearnLimit);
                return;
            }
            Learned::Moved { from } => {
                tracing::debug!(port = %p.name, mac = %info.src, from, "address moved");
            }
            Learned::PinnedElsewhere { pinned_to } if !p.is_vm() => {
                self.announced_away(pinned_to, info.src);
            }
            _ => {}
        }
        if !p.is_vm() && self.pending_moves.load(Ordering::Acquire) > 0 {
            // The moved VM's own frame from beyond the uplink: the network
            // now knows where it is; what was held for it can follow.
            self.finish_move(info.src, "announced from its new host", now);
        }
        let mut inner = None;
        if self.any_dhcp.load(Ordering::Acquire)
            || self.any_igmp.load(Ordering::Acquire)
            || g.ip_source_guard
        {
            let plain = untagged(frame, info.vid);
            if !self.snoop_ingress(id, &p, &g, vlan, &plain, now) {
                return;
            }
            inner = Some(plain);
        }
        if let Some(gate) = self.gate(id) {
            self.gated(id, &p, vlan, gate.as_ref(), frame, now);
            return;
        }
        let inner = Packet {
            frame: inner.unwrap_or_else(|| untagged(frame, info.vid)),
            offload: off,
        };
        self.forward(id, &p, vlan, inner, now);
    }
}

impl Switch {
    /// Announces every VM on the uplink alone: one RARP per up VM port, in
    /// its VLAN (tagged as the uplink's group says), as QEMU's announce-self
    /// does after a migration. Physical switches then move the VMs'
    /// addresses to the member that now carries them, instead of sending
    /// their traffic into the dead one until their tables age.
    fn announce_on(&self, uplink: PortId) -> usize {
        let Some(up) = self.port(uplink) else {
            return 0;
        };
        let Some(ug) = up.group() else { return 0 };
        if ug.blocked {
            return 0;
        }
        let now = Instant::now();
        let ports = self.ports.read();
        let mut sent = 0;
        for (&id, p) in ports.iter() {
            if id == uplink || !p.up.load(Ordering::Relaxed) {
                continue;
            }
            let (Some(mac), Some(g)) = (p.mac, p.group()) else {
                continue;
            };
            if g.blocked {
                continue;
            }
            let Some(vlan) = g.classify(None) else {
                continue;
            };
            let Some(tag) = ug.egress_tagging(vlan) else {
                continue;
            };
            let f = frame::rarp_announce(mac);
            let out = if tag { frame::push_tag(&f, vlan) } else { f };
            up.send(Packet::plain(out), now);
            sent += 1;
        }
        sent
    }

    fn gate(&self, id: PortId) -> Option<Arc<dyn FrameGate>> {
        self.gates.read().get(&id).cloned()
    }

    /// Asks the gate about one plain frame from a VM port and forwards it
    /// if it may go now.
    fn gated(
        &self,
        id: PortId,
        p: &Port,
        vlan: u16,
        gate: &dyn FrameGate,
        frame: &[u8],
        now: Instant,
    ) {
        let out = match gate.check(id, frame) {
            GateDecision::Pass => frame.to_vec(),
            GateDecision::PassRewritten(f) => f,
            GateDecision::Hold => return,
            GateDecision::Drop => {
                p.counters.dropped(DropReason::Gate);
                return;
            }
        };
        let Some(info) = frame::parse(&out) else {
            p.counters.dropped(DropReason::Gate);
            return;
        };
        let out = if info.vid.is_some() {
            frame::pop_tag(&out)
        } else {
            out
        };
        self.forward(id, p, vlan, Packet::plain(out), now);
    }
}

/// The L3 length of the largest frame `frame` is on a wire: the frame
/// without its Ethernet header and 802.1Q/802.1ad tags, and for a TSO
/// packet one full segment (headers plus one MSS).
fn l3_len(f: &[u8], off: &Offload) -> usize {
    let mut l2 = frame::ETH_HDR;
    while l2 + 4 <= f.len()
        && l2 < frame::ETH_HDR + 8
        && matches!(
            u16::from_be_bytes([f[l2 - 2], f[l2 - 1]]),
            frame::TPID_8021Q | frame::TPID_8021AD
        )
    {
        l2 += 4;
    }
    let wire = match off.gso {
        Some(g) => {
            let hdr = usize::from(offload::rx_header(f, off).hdr_len);
            if hdr == 0 {
                f.len()
            } else {
                (hdr + usize::from(g.size)).min(f.len())
            }
        }
        None => f.len(),
    };
    wire.saturating_sub(l2)
}
