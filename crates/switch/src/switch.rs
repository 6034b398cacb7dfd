//! The forwarding core: ports, policy, learning, flooding and the
//! per-frame gate. No I/O of its own: ports hand frames in through
//! [`Ingress`] and take frames out of their [`EgressQueue`].
//!
//! Frames travel the core untagged with their VLAN beside them; the
//! 802.1Q tag is popped on the way in and pushed on the way out according
//! to each port's group.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{InvalidDocument, PortGroup, PortGroupUser, SwitchDocument};
use crate::fdb::{Fdb, FdbEntry, Learned};
use crate::frame::{self, Mac};
use crate::offload::{self, Offload};
use crate::port::{
    CounterSnapshot, DropReason, EgressQueue, Ingress, Packet, PortCounters, PortId, MIN_FRAME,
};
use crate::shaper::TokenBucket;

/// Bytes a port's egress queue may hold (frames are bounded by the
/// document's `port_queue_frames`).
const QUEUE_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PortKind {
    /// A VM NIC (vhost-user).
    Vm {
        vm: String,
        nic: usize,
        mac: String,
    },
    Uplink,
    /// The host's own stack (tap).
    Host,
}

/// What the gate decides for one frame a VM sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateVerdict {
    /// Forward now.
    Pass,
    /// Forward this rewritten frame now (e.g. a TCP acknowledgement
    /// clamped by output commit).
    PassRewritten(Vec<u8>),
    /// The gate keeps the frame and hands it back through
    /// [`Switch::release`] later (output commit).
    Hold,
    Drop,
}

/// The per-frame hook on VM ports, where replication's output commit
/// decides. Called in the port's I/O thread, after policy (VLAN, shaping,
/// security) and before forwarding.
pub trait FrameGate: Send + Sync {
    fn check(&self, port: PortId, frame: &[u8]) -> GateVerdict;
}

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("port group `{0}` does not exist")]
    UnknownPortGroup(String),
    #[error("port `{0}` already exists")]
    DuplicatePort(String),
    #[error("no port with id {0}")]
    NoSuchPort(PortId),
    #[error("creating the port's queue: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Invalid(#[from] InvalidDocument),
}

struct Port {
    name: String,
    kind: PortKind,
    mac: Option<Mac>,
    group_name: String,
    /// Resolved from the document; `None` while the group is gone (the
    /// port is being removed), which drops its traffic.
    group: RwLock<Option<Arc<PortGroup>>>,
    egress: Arc<EgressQueue>,
    counters: Arc<PortCounters>,
    shaper_in: Mutex<Option<TokenBucket>>,
    shaper_out: Mutex<Option<TokenBucket>>,
    /// Whether the shapers above are set: the per-frame paths read these
    /// instead of taking the locks when no policy is configured.
    has_shaper_in: AtomicBool,
    has_shaper_out: AtomicBool,
    up: AtomicBool,
}

impl Port {
    fn group(&self) -> Option<Arc<PortGroup>> {
        self.group.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn resolve(&self, doc: &SwitchDocument, now: Instant) {
        let g = doc.port_group(&self.group_name).cloned().map(Arc::new);
        let shaper = |p: Option<crate::shaper::ShapingPolicy>| p.map(|p| TokenBucket::new(p, now));
        let (policy_in, policy_out) = (
            g.as_ref().and_then(|g| g.shaping_in),
            g.as_ref().and_then(|g| g.shaping_out),
        );
        *lock(&self.shaper_in) = shaper(policy_in);
        *lock(&self.shaper_out) = shaper(policy_out);
        self.has_shaper_in
            .store(policy_in.is_some(), Ordering::Release);
        self.has_shaper_out
            .store(policy_out.is_some(), Ordering::Release);
        *self.group.write().unwrap_or_else(|p| p.into_inner()) = g;
    }
}

/// A port as `tandem switch stats` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PortStats {
    pub id: PortId,
    pub name: String,
    pub kind: String,
    pub port_group: String,
    pub up: bool,
    pub queued: usize,
    pub counters: CounterSnapshot,
}

pub struct Switch {
    ports: RwLock<BTreeMap<PortId, Arc<Port>>>,
    doc: RwLock<Arc<SwitchDocument>>,
    fdb: Mutex<Fdb>,
    gates: RwLock<HashMap<PortId, Arc<dyn FrameGate>>>,
    next_id: AtomicU32,
    /// Some port group has `shaping_in`: without one, a guest's transmit
    /// needs no per-frame port lookup.
    any_shaper_in: AtomicBool,
}

fn has_shaping_in(doc: &SwitchDocument) -> bool {
    doc.port_groups.iter().any(|g| g.shaping_in.is_some())
}

impl Switch {
    pub fn new(doc: SwitchDocument) -> Result<Arc<Self>, InvalidDocument> {
        doc.validate(&[])?;
        let fdb = Fdb::new(
            doc.switch.mac_table_limit,
            Duration::from_secs(doc.switch.mac_aging_s),
        );
        Ok(Arc::new(Self {
            ports: RwLock::new(BTreeMap::new()),
            any_shaper_in: AtomicBool::new(has_shaping_in(&doc)),
            doc: RwLock::new(Arc::new(doc)),
            fdb: Mutex::new(fdb),
            gates: RwLock::new(HashMap::new()),
            next_id: AtomicU32::new(1),
        }))
    }

    pub fn document(&self) -> Arc<SwitchDocument> {
        self.doc.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The VM ports' port groups, which a new document must keep.
    pub fn port_group_users(&self) -> Vec<PortGroupUser> {
        self.ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|p| match &p.kind {
                PortKind::Vm { vm, nic, .. } => Some(PortGroupUser {
                    port_group: p.group_name.clone(),
                    who: format!("vm {vm} nic {nic}"),
                }),
                _ => None,
            })
            .collect()
    }

    /// Validates `doc` against the attached VM ports and makes it the
    /// policy of every port at once. Returns the previous document.
    /// Uplink and host ports are created and removed by the caller
    /// (`SwitchHost`); ports whose group disappears drop their traffic.
    pub fn set_document(
        &self,
        doc: SwitchDocument,
    ) -> Result<Arc<SwitchDocument>, InvalidDocument> {
        doc.validate(&self.port_group_users())?;
        let doc = Arc::new(doc);
        let now = Instant::now();
        let ports = self.ports.read().unwrap_or_else(|p| p.into_inner());
        let prev = std::mem::replace(
            &mut *self.doc.write().unwrap_or_else(|p| p.into_inner()),
            doc.clone(),
        );
        for p in ports.values() {
            p.resolve(&doc, now);
        }
        self.any_shaper_in
            .store(has_shaping_in(&doc), Ordering::Release);
        self.fdb
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_limits(
                doc.switch.mac_table_limit,
                Duration::from_secs(doc.switch.mac_aging_s),
            );
        Ok(prev)
    }

    /// Adds a port in `port_group`; it starts down (see [`Switch::port_up`]).
    pub fn add_port(
        &self,
        name: &str,
        kind: PortKind,
        port_group: &str,
    ) -> Result<(PortId, Arc<EgressQueue>, Arc<PortCounters>), SwitchError> {
        let doc = self.document();
        if doc.port_group(port_group).is_none() {
            return Err(SwitchError::UnknownPortGroup(port_group.into()));
        }
        let mut ports = self.ports.write().unwrap_or_else(|p| p.into_inner());
        if ports.values().any(|p| p.name == name) {
            return Err(SwitchError::DuplicatePort(name.into()));
        }
        let mac = match &kind {
            PortKind::Vm { mac, .. } => mac.parse::<Mac>().ok(),
            _ => None,
        };
        let egress = Arc::new(EgressQueue::new(doc.switch.port_queue_frames, QUEUE_BYTES)?);
        let counters = Arc::new(PortCounters::default());
        let port = Arc::new(Port {
            name: name.into(),
            kind,
            mac,
            group_name: port_group.into(),
            group: RwLock::new(None),
            egress: egress.clone(),
            counters: counters.clone(),
            shaper_in: Mutex::new(None),
            shaper_out: Mutex::new(None),
            has_shaper_in: AtomicBool::new(false),
            has_shaper_out: AtomicBool::new(false),
            up: AtomicBool::new(false),
        });
        port.resolve(&doc, Instant::now());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        ports.insert(id, port);
        Ok((id, egress, counters))
    }

    pub fn remove_port(&self, id: PortId) {
        self.ports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.gates
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.fdb
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush_port(id);
    }

    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, p)| p.name == name)
            .map(|(id, _)| *id)
    }

    fn port(&self, id: PortId) -> Option<Arc<Port>> {
        self.ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// The port's peer is attached (QEMU connected, uplink has carrier).
    /// For a VM port this is the VM announcing itself: its MAC is bound to
    /// this port at once (a VM that migrated or failed over is reachable
    /// before it sends anything) and a RARP from its MAC is flooded so the
    /// switches beyond the uplinks learn it too.
    pub fn port_up(&self, id: PortId) {
        let Some(p) = self.port(id) else { return };
        p.up.store(true, Ordering::Relaxed);
        let (Some(mac), Some(g)) = (p.mac, p.group()) else {
            return;
        };
        let Some(vlan) = g.classify(None) else { return };
        let moved_from =
            self.fdb
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pin(vlan, mac, id, Instant::now());
        if let Some(from) = moved_from {
            tracing::info!(port = %p.name, %mac, from, "MAC moved to this port");
        }
        self.forward(
            id,
            &p,
            vlan,
            Packet::plain(frame::rarp_announce(mac)),
            Instant::now(),
        );
    }

    /// The peer went away: queued frames are dropped and what was learned
    /// on the port is forgotten.
    pub fn port_down(&self, id: PortId) {
        let Some(p) = self.port(id) else { return };
        p.up.store(false, Ordering::Relaxed);
        let n = p.egress.clear();
        for _ in 0..n {
            p.counters.dropped(DropReason::NoBuffer);
        }
        self.fdb
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush_port(id);
    }

    pub fn set_gate(&self, id: PortId, gate: Option<Arc<dyn FrameGate>>) {
        let mut g = self.gates.write().unwrap_or_else(|p| p.into_inner());
        match gate {
            Some(gate) => g.insert(id, gate),
            None => g.remove(&id),
        };
    }

    /// Forwards a frame the gate held, as if the port had just sent it
    /// (policy was applied when it was first received).
    pub fn release(&self, id: PortId, frame: &[u8]) {
        let Some(p) = self.port(id) else { return };
        let Some(g) = p.group() else { return };
        let Some(info) = frame::parse(frame) else {
            return;
        };
        let Some(vlan) = g.classify(info.vid) else {
            return;
        };
        self.forward(
            id,
            &p,
            vlan,
            Packet::plain(untagged(frame, info.vid)),
            Instant::now(),
        );
    }

    /// Forgets addresses not seen for the aging time.
    pub fn age(&self) -> usize {
        self.fdb
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .age(Instant::now())
    }

    pub fn fdb_entries(&self) -> Vec<FdbEntry> {
        self.fdb
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries(Instant::now())
    }

    pub fn stats(&self) -> Vec<PortStats> {
        self.ports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&id, p)| PortStats {
                id,
                name: p.name.clone(),
                kind: match &p.kind {
                    PortKind::Vm { vm, nic, .. } => format!("vm {vm} nic {nic}"),
                    PortKind::Uplink => "uplink".into(),
                    PortKind::Host => "host".into(),
                },
                port_group: p.group_name.clone(),
                up: p.up.load(Ordering::Relaxed),
                queued: p.egress.len(),
                counters: p.counters.snapshot(),
            })
            .collect()
    }

    /// Sends `inner` (untagged, classified into `vlan`) to every port that
    /// should see it. A packet with offload work left goes whole to the
    /// ports that accept it and as finished plain frames to the others.
    fn forward(&self, from: PortId, src_port: &Port, vlan: u16, inner: Packet, now: Instant) {
        let Some(info) = frame::parse(&inner.frame) else {
            return;
        };
        let known = if info.dst.is_group() {
            None
        } else {
            self.fdb
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .lookup(vlan, info.dst, now)
        };
        if known == Some(from) {
            return; // no hairpin: the destination is behind the sender's port
        }
        let ports = self.ports.read().unwrap_or_else(|p| p.into_inner());
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
            if wanted && p.up.load(Ordering::Relaxed) {
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
    fn is_vm(&self) -> bool {
        matches!(self.kind, PortKind::Vm { .. })
    }

    fn shaped_out(&self) -> bool {
        self.has_shaper_out.load(Ordering::Acquire)
    }

    /// Shapes and queues one packet leaving this port.
    fn send(&self, packet: Packet, now: Instant) {
        if self.shaped_out() {
            if let Some(b) = lock(&self.shaper_out).as_mut() {
                if !b.admit(packet.frame.len(), now) {
                    self.counters.dropped(DropReason::Shaped);
                    return;
                }
            }
        }
        if !self.egress.push_packet(packet) {
            self.counters.dropped(DropReason::QueueFull);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The frame without its outer 802.1Q tag.
fn untagged(frame: &[u8], vid: Option<u16>) -> Vec<u8> {
    if vid.is_some() {
        frame::pop_tag(frame)
    } else {
        frame.to_vec()
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
        let result = match lock(&p.shaper_in).as_mut() {
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
        // A VM port's guest was shaped before its frame was taken from
        // the ring (`reserve_tx`); other senders can only be policed.
        if !p.is_vm() {
            if let Some(b) = lock(&p.shaper_in).as_mut() {
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
        let learned = self.fdb.lock().unwrap_or_else(|p| p.into_inner()).learn(
            vlan,
            info.src,
            id,
            g.learn_limit,
            now,
        );
        match learned {
            Learned::PortLimit => {
                p.counters.dropped(DropReason::LearnLimit);
                return;
            }
            Learned::Moved { from } => {
                tracing::debug!(port = %p.name, mac = %info.src, from, "address moved");
            }
            _ => {}
        }
        if let Some(gate) = self.gate(id) {
            self.gated(id, &p, vlan, gate.as_ref(), frame, now);
            return;
        }
        let inner = Packet {
            frame: untagged(frame, info.vid),
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
        let now = Instant::now();
        let ports = self.ports.read().unwrap_or_else(|p| p.into_inner());
        let mut sent = 0;
        for (&id, p) in ports.iter() {
            if id == uplink || !p.up.load(Ordering::Relaxed) {
                continue;
            }
            let (Some(mac), Some(g)) = (p.mac, p.group()) else {
                continue;
            };
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
        self.gates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
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
            GateVerdict::Pass => frame.to_vec(),
            GateVerdict::PassRewritten(f) => f,
            GateVerdict::Hold => return,
            GateVerdict::Drop => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VlanMode;

    fn doc() -> SwitchDocument {
        let mut web = PortGroup::named("web");
        web.vlan = Some(10);
        let mut db = PortGroup::named("db");
        db.vlan = Some(20);
        let mut trunk = PortGroup::named("trunk");
        trunk.vlan_mode = VlanMode::Trunk;
        trunk.allowed_vlans = vec![10, 20];
        let mut spy = PortGroup::named("spy");
        spy.vlan = Some(10);
        spy.allow_promiscuous = true;
        SwitchDocument {
            port_groups: vec![web, db, trunk, spy],
            ..Default::default()
        }
    }

    fn mac(n: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, n])
    }

    fn eth(dst: Mac, src: Mac) -> Vec<u8> {
        let mut f = dst.0.to_vec();
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, 0x5a);
        f
    }

    struct Rig {
        sw: Arc<Switch>,
        q: HashMap<&'static str, (PortId, Arc<EgressQueue>, Arc<PortCounters>)>,
    }

    impl Rig {
        fn new() -> Self {
            let sw = Switch::new(doc()).unwrap();
            let mut q = HashMap::new();
            for (name, n, group) in [
                ("vm1", 1, "web"),
                ("vm2", 2, "web"),
                ("vm3", 3, "web"),
                ("vm4", 4, "db"),
            ] {
                let kind = PortKind::Vm {
                    vm: name.into(),
                    nic: 0,
                    mac: mac(n).to_string(),
                };
                q.insert(name, sw.add_port(name, kind, group).unwrap());
            }
            q.insert("up", sw.add_port("up", PortKind::Uplink, "trunk").unwrap());
            for (id, _, _) in q.values() {
                sw.port_up(*id);
            }
            // Discard the announcements port_up flooded.
            for (_, e, _) in q.values() {
                e.clear();
            }
            Rig { sw, q }
        }
        fn send(&self, port: &str, f: &[u8]) {
            self.sw.ingress(self.q[port].0, f);
        }
        fn take(&self, port: &str) -> Vec<Vec<u8>> {
            std::iter::from_fn(|| self.q[port].1.pop().map(|p| p.frame)).collect()
        }
    }

    #[test]
    fn offloaded_packets_go_whole_only_where_accepted() {
        use crate::offload::{self, RxOffloads, TxOffloads, VnetHdr};
        let r = Rig::new();
        r.q["vm2"].1.set_accepts(RxOffloads {
            csum: true,
            tso4: true,
            tso6: true,
        });
        let mut f = offload::tso_packet(false, false, &[7; 4000], 0x18);
        f[..6].copy_from_slice(&Mac::BROADCAST.0);
        f[6..12].copy_from_slice(&mac(1).0);
        let h = VnetHdr {
            flags: offload::VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: offload::VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let all = TxOffloads {
            csum: true,
            tso4: true,
            tso6: true,
        };
        let off = offload::from_tx(&h, &f, all).unwrap();
        r.sw.ingress_offloaded(r.q["vm1"].0, &f, off);

        let whole: Vec<_> = std::iter::from_fn(|| r.q["vm2"].1.pop()).collect();
        assert_eq!(whole.len(), 1, "one packet for the guest that takes TSO");
        assert_eq!((&whole[0].frame, whole[0].offload), (&f, off));
        let segs = r.take("vm3");
        assert_eq!(segs.len(), 3, "segmented for the guest that does not");
        assert!(segs.iter().all(|s| s.len() <= crate::port::MAX_FRAME));
        let up = r.take("up");
        assert_eq!(up.len(), 3, "segmented for the wire");
        for (u, s) in up.iter().zip(&segs) {
            assert_eq!(frame::parse(u).unwrap().vid, Some(10));
            assert_eq!(&frame::pop_tag(u), s);
        }
        let c = r.q["vm1"].2.snapshot();
        assert_eq!(c.drops, Default::default());
    }

    #[test]
    fn uplink_member_change_announces_every_vm_on_the_uplink_only() {
        let r = Rig::new();
        r.sw.port_down(r.q["vm3"].0);
        r.sw.uplink_active_changed(r.q["up"].0);
        let mut seen: Vec<(u16, Mac)> = r
            .take("up")
            .iter()
            .map(|f| {
                let i = frame::parse(f).unwrap();
                assert_eq!(i.ethertype, frame::ETHERTYPE_RARP);
                assert_eq!(i.dst, Mac::BROADCAST);
                (i.vid.unwrap(), i.src)
            })
            .collect();
        seen.sort();
        // vm3 is down; vm1/vm2 are in VLAN 10, vm4 in VLAN 20.
        assert_eq!(seen, vec![(10, mac(1)), (10, mac(2)), (20, mac(4))]);
        for vm in ["vm1", "vm2", "vm3", "vm4"] {
            assert!(r.take(vm).is_empty(), "{vm} got an announcement");
        }
    }

    #[test]
    fn broadcast_floods_within_the_vlan_and_tags_on_trunks() {
        let r = Rig::new();
        let f = eth(Mac::BROADCAST, mac(1));
        r.send("vm1", &f);
        assert_eq!(
            r.take("vm1"),
            Vec::<Vec<u8>>::new(),
            "never back to the sender"
        );
        assert_eq!(r.take("vm2"), vec![f.clone()]);
        assert_eq!(r.take("vm3"), vec![f.clone()]);
        assert!(r.take("vm4").is_empty(), "other VLAN");
        let up = r.take("up");
        assert_eq!(up.len(), 1);
        assert_eq!(frame::parse(&up[0]).unwrap().vid, Some(10));
        assert_eq!(frame::pop_tag(&up[0]), f);
    }

    #[test]
    fn pinned_vm_macs_get_unicast_without_flooding() {
        let r = Rig::new();
        let f = eth(mac(2), mac(1));
        r.send("vm1", &f);
        assert_eq!(r.take("vm2"), vec![f]);
        assert!(r.take("vm3").is_empty());
        assert!(r.take("up").is_empty());
    }

    #[test]
    fn tagged_frames_from_the_uplink_reach_their_vlan_untagged() {
        let r = Rig::new();
        let outside = Mac([2, 0, 0, 0, 0, 0x99]);
        let f = eth(mac(4), outside);
        r.send("up", &frame::push_tag(&f, 20));
        assert_eq!(r.take("vm4"), vec![f.clone()]);
        // The reply goes back to the learned port, tagged.
        r.send("vm4", &eth(outside, mac(4)));
        let back = r.take("up");
        assert_eq!(back.len(), 1);
        assert_eq!(frame::parse(&back[0]).unwrap().vid, Some(20));
        // A VLAN the trunk does not carry is dropped and counted.
        r.send("up", &frame::push_tag(&f, 30));
        assert_eq!(r.q["up"].2.snapshot().drops.vlan, 1);
        assert!(r.take("vm4").is_empty());
    }

    #[test]
    fn access_ports_refuse_tags_and_spoofed_sources() {
        let r = Rig::new();
        r.send("vm1", &frame::push_tag(&eth(Mac::BROADCAST, mac(1)), 10));
        r.send("vm1", &eth(Mac::BROADCAST, mac(77)));
        r.send("vm1", &[0u8; 10]);
        let d = r.q["vm1"].2.snapshot().drops;
        assert_eq!((d.vlan, d.security, d.malformed), (1, 1, 1));
        assert!(r.take("vm2").is_empty());
    }

    #[test]
    fn promiscuous_ports_see_their_vlans_unicast() {
        let r = Rig::new();
        let (spy, q, _) =
            r.sw.add_port(
                "spy",
                PortKind::Vm {
                    vm: "spy".into(),
                    nic: 0,
                    mac: mac(9).to_string(),
                },
                "spy",
            )
            .unwrap();
        r.sw.port_up(spy);
        q.clear();
        let f = eth(mac(2), mac(1));
        r.send("vm1", &f);
        assert_eq!(q.pop().map(|p| p.frame), Some(f));
    }

    #[test]
    fn gate_holds_and_releases() {
        struct HoldAll(Mutex<Vec<Vec<u8>>>);
        impl FrameGate for HoldAll {
            fn check(&self, _: PortId, f: &[u8]) -> GateVerdict {
                self.0.lock().unwrap().push(f.to_vec());
                GateVerdict::Hold
            }
        }
        let r = Rig::new();
        let gate = Arc::new(HoldAll(Mutex::new(vec![])));
        r.sw.set_gate(r.q["vm1"].0, Some(gate.clone()));
        let f = eth(mac(2), mac(1));
        r.send("vm1", &f);
        assert!(r.take("vm2").is_empty(), "held");
        let held = gate.0.lock().unwrap().pop().unwrap();
        r.sw.release(r.q["vm1"].0, &held);
        assert_eq!(r.take("vm2"), vec![f]);
    }

    #[test]
    fn a_full_queue_drops_only_for_its_port() {
        let r = Rig::new();
        let f = eth(Mac::BROADCAST, mac(1));
        for _ in 0..2000 {
            r.send("vm1", &f);
        }
        assert!(r.q["vm2"].2.snapshot().drops.queue_full > 0);
        assert_eq!(r.take("vm3").len(), crate::config::DEFAULT_QUEUE_FRAMES);
    }

    #[test]
    fn invalid_documents_change_nothing() {
        let r = Rig::new();
        let before = r.sw.document();
        let mut bad = doc();
        bad.port_groups.retain(|g| g.name != "db");
        let e = r.sw.set_document(bad).unwrap_err();
        assert!(e.to_string().contains("vm vm4 nic 0"), "{e}");
        assert_eq!(r.sw.document(), before);
    }

    #[test]
    fn shaping_in_makes_a_guest_wait_and_polices_an_uplink() {
        let mut d = doc();
        let policy = crate::shaper::ShapingPolicy {
            average_kbps: 1000,
            peak_kbps: 2000,
            burst_bytes: 3000,
        };
        d.port_groups[0].shaping_in = Some(policy);
        d.port_groups[2].shaping_in = Some(policy);
        let r = Rig::new();
        r.sw.set_document(d).unwrap();
        // A guest is asked to wait, not dropped: 60-byte frames until the
        // buckets are in debt, then a wait of about one frame's worth.
        let (vm1, t0) = (r.q["vm1"].0, Instant::now());
        let mut allowed = 0;
        let wait = loop {
            match r.sw.reserve_tx(vm1, 60, t0) {
                Ok(()) => allowed += 1,
                Err(w) => break w,
            }
            assert!(allowed < 1000);
        };
        assert!((10..=60).contains(&allowed), "{allowed} frames in a burst");
        assert!(wait <= Duration::from_millis(1), "{wait:?}");
        assert_eq!(r.sw.reserve_tx(vm1, 60, t0 + wait), Ok(()));
        assert_eq!(
            r.sw.reserve_tx(r.q["vm4"].0, 60, t0),
            Ok(()),
            "unshaped group"
        );
        // What a guest sends was shaped already: not policed again.
        let f = eth(Mac::BROADCAST, mac(1));
        for _ in 0..100 {
            r.send("vm1", &f);
        }
        assert_eq!(r.take("vm2").len(), 100);
        // An uplink cannot be made to wait: it is policed.
        let mut g = frame::push_tag(&eth(Mac::BROADCAST, mac(9)), 10);
        g.resize(1000, 0);
        for _ in 0..100 {
            r.send("up", &g);
        }
        let got = r.take("vm2").len();
        assert!(
            (1..=5).contains(&got),
            "{got} frames passed a 3000-byte burst"
        );
        assert!(r.q["up"].2.snapshot().drops.shaped >= 90);
    }
}
