//! The forwarding core: ports, policy, learning, flooding and the
//! per-frame gate. No I/O of its own: ports hand frames in through
//! [`Ingress`](crate::port::Ingress) and take frames out of their [`EgressQueue`].
//!
//! Frames travel the core untagged with their VLAN beside them; the
//! 802.1Q tag is popped on the way in and pushed on the way out according
//! to each port's group.

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tandem_outcommit::{Gate, GateDecision};

use crate::config::{InvalidDocument, PortGroup, PortGroupUser, SwitchDocument};
use crate::fdb::{Fdb, FdbEntry};
use crate::frame::{self, Mac};
use crate::port::{CounterSnapshot, DropReason, EgressQueue, Packet, PortCounters, PortId};
use crate::shaper::TokenBucket;

mod forward;
mod snoop;
#[cfg(test)]
mod snoop_tests;
#[cfg(test)]
mod tests;

pub use snoop::{
    Association, AssociationView, NicNetState, SnoopCounters, SnoopLogEntry, SnoopRequest,
    SnoopingStats, QUERIER_MAC,
};

/// Bytes a port's egress queue may hold (frames are bounded by the
/// document's `port_queue_frames`).
const QUEUE_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PortKind {
    /// A VM NIC (vhost-user). Its MAC is the only source address the port
    /// may send from, unless its port group allows MAC changes.
    Vm {
        vm: String,
        nic: usize,
        mac: Mac,
    },
    Uplink,
    /// The host's own stack (tap).
    Host,
}

/// The per-frame hook on VM ports, where replication's output commit
/// decides. Called in the port's I/O thread, after policy (VLAN, shaping,
/// security) and before forwarding. Its verdict is output commit's
/// [`GateDecision`]: forward now (as is or rewritten), held (the frame
/// comes back through [`Switch::release`]), or dropped (counted as a
/// `gate` drop).
pub trait FrameGate: Send + Sync {
    fn check(&self, port: PortId, frame: &[u8]) -> GateDecision;
}

/// A protected VM's output-commit gate answers the hook itself.
impl FrameGate for Gate {
    fn check(&self, port: PortId, frame: &[u8]) -> GateDecision {
        Gate::check(self, port, frame)
    }
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
    /// The VM is migrating away: from the moment its rings stop, frames
    /// for it are queued (bounded, in order) instead of dropped, until the
    /// switchover ends (see `Switch::switchover_moved`).
    departing: AtomicBool,
    /// While departing: the VM's own address arrived through an uplink,
    /// so the network beyond already sends its traffic to the new host.
    announced_away: AtomicBool,
    /// A migrating VM pre-associated here whose rings have not run yet:
    /// frames for it (its handed-over groups, broadcasts) are queued,
    /// newest kept, so the downtime does not cost it what arrived here
    /// meanwhile (a tap in a Linux bridge buffers the same way).
    arriving: AtomicBool,
    /// The largest L3 payload the port carries either way (the document's
    /// `mtu` of an uplink or host port); 0 for no limit of its own.
    mtu: AtomicU32,
}

impl Port {
    fn group(&self) -> Option<Arc<PortGroup>> {
        self.group.read().clone()
    }

    fn resolve(&self, doc: &SwitchDocument, now: Instant) {
        let g = doc.port_group(&self.group_name).cloned().map(Arc::new);
        let shaper = |p: Option<crate::shaper::ShapingPolicy>| p.map(|p| TokenBucket::new(p, now));
        let (policy_in, policy_out) = (
            g.as_ref().and_then(|g| g.shaping_in),
            g.as_ref().and_then(|g| g.shaping_out),
        );
        *self.shaper_in.lock() = shaper(policy_in);
        *self.shaper_out.lock() = shaper(policy_out);
        self.has_shaper_in
            .store(policy_in.is_some(), Ordering::Release);
        self.has_shaper_out
            .store(policy_out.is_some(), Ordering::Release);
        let mtu = match self.kind {
            PortKind::Host => doc
                .host_ports
                .iter()
                .find(|h| h.name == self.name)
                .and_then(|h| h.mtu),
            PortKind::Uplink => doc
                .uplinks
                .iter()
                .find(|u| u.name == self.name)
                .and_then(|u| u.mtu),
            PortKind::Vm { .. } => None,
        };
        self.mtu.store(mtu.unwrap_or(0), Ordering::Relaxed);
        let blocked = g.as_ref().is_some_and(|g| g.blocked);
        *self.group.write() = g;
        if blocked {
            // Frames queued before the block would otherwise still leave:
            // once the document is in place the port forwards nothing.
            let n = self.egress.clear();
            for _ in 0..n {
                self.counters.dropped(DropReason::Blocked);
            }
        }
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

/// What `tandem switch stats` shows.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SwitchStats {
    pub ports: Vec<PortStats>,
    /// Uplink name → the member interface carrying its traffic.
    pub uplinks_active: BTreeMap<String, Option<String>>,
    pub mac_table: Vec<FdbEntry>,
    /// Every uplink member, with the LLDP neighbour heard on it (while its
    /// TTL lasts) and its LLDP frame counts. Absent in stats from before
    /// neighbours were heard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplink_neighbours: Vec<crate::lldp::UplinkNeighbour>,
    /// DHCP bindings, IGMP memberships, VM port associations and their
    /// log. Absent in stats from before snooping.
    #[serde(default)]
    pub snooping: SnoopingStats,
}

/// What an apply changed.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Ports changed in place: a host port's addresses or MTU, an
    /// uplink's MTU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
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
    /// Some port group snoops DHCP / IGMP: without one, no frame is
    /// looked at for them.
    any_dhcp: AtomicBool,
    any_igmp: AtomicBool,
    snoop: Mutex<snoop::Snooping>,
    /// Moved VMs whose held frames wait for the VM's announcement from its
    /// new host (see `Switch::switchover_moved`): without one, no unicast
    /// frame is looked at for them.
    pending_moves: std::sync::atomic::AtomicUsize,
}

fn has_shaping_in(doc: &SwitchDocument) -> bool {
    doc.port_groups.iter().any(|g| g.shaping_in.is_some())
}

fn has_dhcp_snooping(doc: &SwitchDocument) -> bool {
    doc.port_groups.iter().any(|g| g.dhcp_snooping)
}

fn has_igmp_snooping(doc: &SwitchDocument) -> bool {
    doc.port_groups.iter().any(|g| g.igmp_snooping)
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
            any_dhcp: AtomicBool::new(has_dhcp_snooping(&doc)),
            any_igmp: AtomicBool::new(has_igmp_snooping(&doc)),
            snoop: Mutex::new(snoop::Snooping::new()),
            pending_moves: std::sync::atomic::AtomicUsize::new(0),
            doc: RwLock::new(Arc::new(doc)),
            fdb: Mutex::new(fdb),
            gates: RwLock::new(HashMap::new()),
            next_id: AtomicU32::new(1),
        }))
    }

    pub fn document(&self) -> Arc<SwitchDocument> {
        self.doc.read().clone()
    }

    /// The VM ports' port groups, which a new document must keep.
    pub fn port_group_users(&self) -> Vec<PortGroupUser> {
        self.ports
            .read()
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
        let ports = self.ports.read();
        let prev = std::mem::replace(&mut *self.doc.write(), doc.clone());
        for p in ports.values() {
            p.resolve(&doc, now);
        }
        self.any_shaper_in
            .store(has_shaping_in(&doc), Ordering::Release);
        self.any_dhcp
            .store(has_dhcp_snooping(&doc), Ordering::Release);
        self.any_igmp
            .store(has_igmp_snooping(&doc), Ordering::Release);
        self.fdb.lock().set_limits(
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
        let mut ports = self.ports.write();
        if ports.values().any(|p| p.name == name) {
            return Err(SwitchError::DuplicatePort(name.into()));
        }
        let mac = match &kind {
            PortKind::Vm { mac, .. } => Some(*mac),
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
            departing: AtomicBool::new(false),
            announced_away: AtomicBool::new(false),
            arriving: AtomicBool::new(false),
            mtu: AtomicU32::new(0),
        });
        port.resolve(&doc, Instant::now());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if matches!(port.kind, PortKind::Uplink) {
            // Uplinks lead to the multicast routers of the network beyond.
            self.snoop.lock().set_static_router(id);
        }
        ports.insert(id, port);
        Ok((id, egress, counters))
    }

    pub fn remove_port(&self, id: PortId) {
        self.ports.write().remove(&id);
        self.gates.write().remove(&id);
        self.fdb.lock().flush_port(id);
        self.snoop.lock().forget_port(id);
    }

    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.ports
            .read()
            .iter()
            .find(|(_, p)| p.name == name)
            .map(|(id, _)| *id)
    }

    /// The name of the port group `id` belongs to.
    pub fn port_group_of(&self, id: PortId) -> Option<String> {
        self.port(id).map(|p| p.group_name.clone())
    }

    fn port(&self, id: PortId) -> Option<Arc<Port>> {
        self.ports.read().get(&id).cloned()
    }

    /// The port's peer is attached (QEMU connected, uplink has carrier).
    /// For a VM port this is the VM announcing itself: its MAC is bound to
    /// this port at once (a VM that migrated or failed over is reachable
    /// before it sends anything) and a RARP from its MAC is flooded so the
    /// switches beyond the uplinks learn it too.
    pub fn port_up(&self, id: PortId) {
        let Some(p) = self.port(id) else { return };
        p.up.store(true, Ordering::Relaxed);
        p.arriving.store(false, Ordering::Release);
        let (Some(mac), Some(g)) = (p.mac, p.group()) else {
            return;
        };
        let Some(vlan) = g.classify(None) else { return };
        if g.blocked {
            // The binding waits for the unblock: a blocked port's MAC is
            // not announced, nor taken from where it may be reachable.
            return;
        }
        let moved_from = self.fdb.lock().pin(vlan, mac, id, Instant::now());
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
        self.associate(id, &p, Instant::now());
    }

    /// The peer went away: queued frames are dropped and what was learned
    /// on the port is forgotten.
    pub fn port_down(&self, id: PortId) {
        let Some(p) = self.port(id) else { return };
        p.up.store(false, Ordering::Relaxed);
        if p.departing.load(Ordering::Acquire) {
            // A migrating VM's rings stopped: what arrives for it now is
            // kept for wherever it ends up, and its address stays here
            // until then.
            tracing::info!(port = %p.name, "VM stopped for its switchover; frames for it are queued");
            return;
        }
        if p.arriving.load(Ordering::Acquire) {
            return; // not yet up: what waits for the arriving VM stays
        }
        let n = p.egress.clear();
        for _ in 0..n {
            p.counters.dropped(DropReason::NoBuffer);
        }
        self.fdb.lock().flush_port(id);
    }

    pub fn set_gate(&self, id: PortId, gate: Option<Arc<dyn FrameGate>>) {
        let mut g = self.gates.write();
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
        if g.blocked {
            p.counters.dropped(DropReason::Blocked);
            return;
        }
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
        let now = Instant::now();
        self.snoop_age(now);
        self.fdb.lock().age(now)
    }

    pub fn fdb_entries(&self) -> Vec<FdbEntry> {
        self.fdb.lock().entries(Instant::now())
    }

    pub fn stats(&self) -> Vec<PortStats> {
        self.ports
            .read()
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
}

/// The frame without its outer 802.1Q tag.
fn untagged(frame: &[u8], vid: Option<u16>) -> Vec<u8> {
    if vid.is_some() {
        frame::pop_tag(frame)
    } else {
        frame.to_vec()
    }
}
