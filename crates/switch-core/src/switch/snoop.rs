//! DHCP and IGMP snooping in the forwarding core, and the association of
//! VM ports that tells a migrated VM from a new one (IEEE 802.1Qbg VDP's
//! pre-associate / associate / de-associate, with the migrate-to hint).
//!
//! A VM port is pre-associated when its VM is defined on this host (for a
//! migration: before any RAM moves), and associated when its rings first
//! run here. A *migrated* VM's association rebuilds, at once, the state a
//! switch otherwise relearns in minutes: the DHCP bindings and multicast
//! memberships handed over from the source are installed, the VM's port
//! alone gets an IGMP query (its reports confirm the groups within a
//! second), and if no binding came with it the host asks a DHCP server
//! (lease query, then an assisted renewal). A new VM starts with nothing.
//! De-association (the VM left or was destroyed) removes the port's
//! bindings and memberships.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Port, PortKind, Switch, SwitchError};
use crate::config::{PortGroup, UnknownLease};
use crate::dhcp::{self, BindingRecord, BindingTable, Snooped};
use crate::frame::{self, Mac};
use crate::igmp::{self, GroupMembership, MembershipTable, Observed};
use crate::port::{DropReason, Packet, PortId};

/// Bindings the table holds at most (all VLANs together).
pub const BINDING_LIMIT: usize = 4096;
/// (VLAN, group, port) memberships held at most.
pub const MEMBERSHIP_LIMIT: usize = 4096;
/// RFC 3376's membership interval (robustness 2 × 125 s + 10 s).
const MEMBERSHIP_INTERVAL: Duration = Duration::from_secs(260);
/// RFC 3376's other-querier-present interval.
const ROUTER_TIMEOUT: Duration = Duration::from_secs(255);
/// How often the switch queries its VM ports where no router does.
const QUERY_INTERVAL: Duration = Duration::from_secs(125);
/// The max response time of the query a migrated VM's port gets, in
/// tenths of a second: its reports arrive within a second, not within
/// the usual 10.
const TRIGGERED_MAX_RESP_DS: u32 = 10;
const LOG_ENTRIES: usize = 128;
const REQUESTS_QUEUED: usize = 256;
/// The source of the switch's own IGMP queries: locally administered, and
/// 0.0.0.0 as the IP source (RFC 4541 2.1.1: a snooping switch's proxy
/// query). Hosts answer it like any query.
pub const QUERIER_MAC: Mac = Mac([0x02, 0x74, 0x64, 0x6d, 0x00, 0x01]);

/// A VM NIC's network state as it crosses hosts with the VM (a
/// migration's handover) and as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicNetState {
    pub mac: Mac,
    #[serde(default)]
    pub bindings: Vec<BindingRecord>,
    #[serde(default)]
    pub groups: Vec<Ipv4Addr>,
}

/// What a host knows when it pre-associates a VM port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Association {
    /// The VM arrives from another host (VDP's migrate-to hint, the
    /// seed's flag): rebuild its state on association.
    pub migrated: bool,
    /// The source's state for this NIC, when the source could give it.
    pub handover: Option<NicNetState>,
}

/// Work the host's I/O side does for the core (it owns the sockets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnoopRequest {
    /// A migrated VM arrived without a binding: ask a DHCP server.
    LeaseRefresh {
        port: PortId,
        port_name: String,
        mac: Mac,
        vlan: u16,
        client_id: Option<Vec<u8>>,
        /// Servers to ask, in order: those the handover named, then the
        /// port group's `dhcp_servers`.
        servers: Vec<Ipv4Addr>,
        /// An address the VM was seen to use (for the assisted renewal).
        ip_hint: Option<Ipv4Addr>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnoopCounters {
    pub bindings_learned: u64,
    pub bindings_handed_over: u64,
    pub bindings_from_lease_query: u64,
    pub bindings_removed: u64,
    pub binding_table_full: u64,
    pub dhcp_server_dropped: u64,
    pub source_guard_dropped: u64,
    pub igmp_reports: u64,
    pub igmp_queries_heard: u64,
    pub igmp_queries_sent: u64,
    pub triggered_queries: u64,
    pub lease_refreshes_asked: u64,
    pub leases_unknown: u64,
    /// Frames that arrived for a VM during its switchover and were
    /// forwarded on to its new host, or delivered here after an abort.
    pub switchover_forwarded: u64,
    pub switchover_delivered: u64,
    pub associations: u64,
    pub migrated_associations: u64,
    pub de_associations: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnoopLogEntry {
    pub unix_ms: u64,
    pub port: String,
    pub event: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssociationView {
    pub port: String,
    pub migrated: bool,
    pub associated: bool,
    /// IP source guard lets this port through until it holds a binding
    /// (a migrated VM under the `open` unknown-lease policy).
    pub guard_open: bool,
}

/// What `tandem switch stats` shows of snooping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnoopingStats {
    pub bindings: Vec<BindingRecord>,
    pub groups: Vec<GroupMembership>,
    pub associations: Vec<AssociationView>,
    pub counters: SnoopCounters,
    pub log: Vec<SnoopLogEntry>,
}

#[derive(Debug, Clone)]
struct PortAssoc {
    migrated: bool,
    handover: Option<NicNetState>,
    associated: bool,
    guard_open: bool,
    /// The last IPv4 address the VM claimed (for an assisted renewal).
    seen_ip: Option<Ipv4Addr>,
}

pub(super) struct Snooping {
    bindings: BindingTable,
    groups: MembershipTable,
    assoc: HashMap<PortId, PortAssoc>,
    requests: VecDeque<SnoopRequest>,
    counters: SnoopCounters,
    log: VecDeque<SnoopLogEntry>,
    last_query: HashMap<u16, Instant>,
    /// Moved VMs' held frames, by the VM's MAC, until it is announced
    /// from its new host or [`MOVE_ANNOUNCE_BOUND`] passes.
    pending_moves: HashMap<Mac, PendingMove>,
}

/// How long a moved VM's held frames wait for its announcement from the
/// new host before they are forwarded anyway (the destination switch
/// announces it as its rings first run, normally within tens of ms).
pub(super) const MOVE_ANNOUNCE_BOUND: Duration = Duration::from_secs(1);

pub(super) struct PendingMove {
    port: std::sync::Arc<Port>,
    id: PortId,
    since: Instant,
    /// In arrival order, at most the port's queue bound.
    frames: VecDeque<(u16, Packet)>,
    limit: usize,
}

impl Snooping {
    pub(super) fn new() -> Self {
        Self {
            bindings: BindingTable::new(BINDING_LIMIT),
            groups: MembershipTable::new(MEMBERSHIP_LIMIT, MEMBERSHIP_INTERVAL, ROUTER_TIMEOUT),
            assoc: HashMap::new(),
            requests: VecDeque::new(),
            counters: SnoopCounters::default(),
            log: VecDeque::new(),
            last_query: HashMap::new(),
            pending_moves: HashMap::new(),
        }
    }

    fn note(&mut self, port: &str, event: String) {
        tracing::info!(port, "{event}");
        if self.log.len() >= LOG_ENTRIES {
            self.log.pop_front();
        }
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.log.push_back(SnoopLogEntry {
            unix_ms,
            port: port.to_string(),
            event,
        });
    }

    pub(super) fn forget_port(&mut self, id: PortId) {
        self.bindings.remove_port(id);
        self.groups.remove_port(id);
        self.assoc.remove(&id);
    }

    pub(super) fn set_static_router(&mut self, id: PortId) {
        self.groups.set_static_router(id, true);
    }

    /// Where IPv4 multicast to `group` in `vlan` goes among ports whose
    /// group snoops IGMP; `None` floods (a link-local group).
    pub(super) fn multicast_targets(
        &self,
        vlan: u16,
        group: Ipv4Addr,
        now: Instant,
    ) -> Option<Vec<PortId>> {
        self.groups.targets(vlan, group, now)
    }

    pub(super) fn router_ports(&self, vlan: u16, now: Instant) -> Vec<PortId> {
        self.groups.routers(vlan, now)
    }
}

/// Whether a frame is an IGMP report or leave (not a query): what RFC
/// 4541 2.1.1 sends to router ports only.
pub(super) fn is_igmp_membership(frame: &[u8]) -> bool {
    igmp::is_igmp(frame)
        && igmp::parse_frame(frame)
            .is_some_and(|f| !matches!(f.msg, igmp::IgmpMessage::Query { .. }))
}

/// The group a frame is IPv4 multicast to, if IGMP snooping may confine
/// it: not IGMP itself, not a link-local control group.
pub(super) fn confinable_group(frame: &[u8]) -> Option<Ipv4Addr> {
    if frame.len() < 3 || frame[0..3] != [0x01, 0x00, 0x5e] || igmp::is_igmp(frame) {
        return None;
    }
    igmp::ipv4_multicast_destination(frame).filter(|g| !igmp::is_link_local_group(*g))
}

/// What DHCP snooping decided about a frame that parsed as DHCP.
enum DhcpVerdict {
    /// A server message from a port not trusted to send one.
    Drop,
    /// A server message from a trusted port (an uplink or a trusted
    /// group): it goes on without the source guard.
    TrustedServer,
    /// Anything else: it goes on to the source guard.
    Client,
}

impl Switch {
    /// Snooping's part of a frame's way in, after the port's policy (VLAN,
    /// shaping, MAC security) and learning: `inner` is the frame without
    /// its tag. Returns whether the frame may go on.
    pub(super) fn snoop_ingress(
        &self,
        id: PortId,
        p: &Port,
        g: &PortGroup,
        vlan: u16,
        inner: &[u8],
        now: Instant,
    ) -> bool {
        let dhcp_on = self.any_dhcp.load(Ordering::Acquire);
        if dhcp_on && dhcp::is_dhcp(inner) {
            // Only a frame that parses as DHCP is DHCP's business; other
            // UDP on ports 67/68 meets the source guard like any packet.
            // A well-formed request from the client port to the server
            // port passes the guard, as on hardware switches: only a DHCP
            // server receives it, and it is how a guest with no binding
            // here (restarted, or migrated under `block`) gets one back.
            if let Some(df) = dhcp::parse_frame(inner) {
                match self.snoop_dhcp(id, p, g, vlan, &df, now) {
                    DhcpVerdict::Drop => return false,
                    DhcpVerdict::TrustedServer => return true,
                    DhcpVerdict::Client
                        if df.src_port == dhcp::CLIENT_PORT && df.dst_port == dhcp::SERVER_PORT =>
                    {
                        return true
                    }
                    DhcpVerdict::Client => {}
                }
            }
        }
        if g.ip_source_guard && p.is_vm() {
            if let Some(claim) = dhcp::ipv4_claim(inner) {
                if !claim.ip.is_unspecified() {
                    let mut s = self.snoop.lock();
                    let open = s.assoc.get(&id).is_some_and(|a| a.guard_open);
                    if let Some(a) = s.assoc.get_mut(&id) {
                        a.seen_ip = Some(claim.ip);
                    }
                    if !open && !s.bindings.permits(vlan, id, claim.mac, claim.ip, now) {
                        s.counters.source_guard_dropped += 1;
                        drop(s);
                        p.counters.dropped(DropReason::SourceGuard);
                        return false;
                    }
                }
            }
        }
        if self.any_igmp.load(Ordering::Acquire) && igmp::is_igmp(inner) {
            if let Some(f) = igmp::parse_frame(inner) {
                let mut s = self.snoop.lock();
                // Queries mark router ports wherever they come from;
                // memberships are kept only for ports that snoop.
                let is_query = matches!(f.msg, igmp::IgmpMessage::Query { .. });
                if is_query || g.igmp_snooping {
                    match s.groups.observe(vlan, id, &f.msg, now) {
                        Observed::Joined { group, new } => {
                            s.counters.igmp_reports += 1;
                            if new {
                                s.note(&p.name, format!("joined {group} (VLAN {vlan})"));
                            }
                        }
                        Observed::Left { group } => {
                            s.note(&p.name, format!("left {group} (VLAN {vlan})"));
                        }
                        Observed::Query { .. } => s.counters.igmp_queries_heard += 1,
                        Observed::TableFull => {
                            tracing::warn!(port = %p.name, "IGMP membership table full")
                        }
                        Observed::Ignored => {}
                    }
                }
            }
        }
        true
    }

    fn snoop_dhcp(
        &self,
        id: PortId,
        p: &Port,
        g: &PortGroup,
        vlan: u16,
        df: &dhcp::DhcpFrame,
        now: Instant,
    ) -> DhcpVerdict {
        let trusted = !p.is_vm() || g.dhcp_trusted;
        if df.msg.is_server_message() {
            if !trusted {
                if g.dhcp_snooping {
                    self.snoop.lock().counters.dhcp_server_dropped += 1;
                    p.counters.dropped(DropReason::DhcpServer);
                    return DhcpVerdict::Drop;
                }
                // An untrusted VM's server message where nothing snoops
                // is still just a packet from that VM.
                return DhcpVerdict::Client;
            }
            // Bound to the client's port: learned only where that port's
            // group snoops.
            let to = self.fdb.lock().lookup(vlan, df.msg.chaddr, now);
            let Some(to) = to else {
                return DhcpVerdict::TrustedServer;
            };
            let Some(tp) = self.port(to) else {
                return DhcpVerdict::TrustedServer;
            };
            if !tp.group().is_some_and(|tg| tg.dhcp_snooping) {
                return DhcpVerdict::TrustedServer;
            }
            let mut s = self.snoop.lock();
            let r = s.bindings.observe_server(vlan, to, &df.msg, now);
            self.after_snooped(&mut s, to, &tp.name, r, "learned");
            DhcpVerdict::TrustedServer
        } else {
            if p.is_vm() && g.dhcp_snooping {
                let mut s = self.snoop.lock();
                let r = s.bindings.observe_client(vlan, id, &df.msg, now);
                self.after_snooped(&mut s, id, &p.name, r, "client");
            }
            DhcpVerdict::Client
        }
    }

    fn after_snooped(&self, s: &mut Snooping, port: PortId, name: &str, r: Snooped, how: &str) {
        match r {
            Snooped::Installed(b) | Snooped::Renewed(b) => {
                if how == "learned" {
                    s.counters.bindings_learned += 1;
                }
                if let Some(a) = s.assoc.get_mut(&port) {
                    // A binding of its own now vouches for the VM.
                    a.guard_open = false;
                }
                s.note(
                    name,
                    format!("binding {} {} VLAN {} ({how})", b.mac, b.ip, b.vlan),
                );
            }
            Snooped::Removed(b) => {
                s.counters.bindings_removed += 1;
                s.note(name, format!("binding {} {} removed", b.mac, b.ip));
            }
            Snooped::TableFull => {
                s.counters.binding_table_full += 1;
                tracing::warn!(port = name, "DHCP binding table full");
            }
            Snooped::Ignored(_) => {}
        }
    }

    /// VDP pre-associate: the VM port's policy is in place (its port
    /// group resolved when the port was added) and `assoc` says what to do
    /// when the VM first runs here. A port already up is associated now.
    pub fn pre_associate(&self, id: PortId, assoc: Association) -> Result<(), SwitchError> {
        let p = self.port(id).ok_or(SwitchError::NoSuchPort(id))?;
        {
            let mut s = self.snoop.lock();
            let what = if assoc.migrated {
                format!(
                    "pre-associated (migrated: {} bindings, {} groups handed over)",
                    assoc.handover.as_ref().map_or(0, |h| h.bindings.len()),
                    assoc.handover.as_ref().map_or(0, |h| h.groups.len())
                )
            } else {
                "pre-associated (new VM)".to_string()
            };
            // A live migration's destination (a handover came): its
            // groups reach the port from now on, and what arrives for it
            // before its rings run waits in its queue.
            if let (Some(h), Some(vlan), false) = (
                &assoc.handover,
                p.group().and_then(|g| g.classify(None)),
                p.up.load(Ordering::Relaxed),
            ) {
                if assoc.migrated {
                    let now = Instant::now();
                    for &group in &h.groups {
                        s.groups.join(vlan, group, id, now);
                    }
                    p.arriving.store(true, Ordering::Release);
                }
            }
            s.assoc.insert(
                id,
                PortAssoc {
                    migrated: assoc.migrated,
                    handover: assoc.handover,
                    associated: false,
                    guard_open: false,
                    seen_ip: None,
                },
            );
            s.note(&p.name, what);
        }
        if p.up.load(Ordering::Relaxed) {
            self.associate(id, &p, Instant::now());
        }
        Ok(())
    }

    /// VDP associate: the VM runs here (its port came up). Called from
    /// `port_up`; only the first time after a pre-association does
    /// anything.
    pub(super) fn associate(&self, id: PortId, p: &Port, now: Instant) {
        let (Some(mac), Some(g)) = (p.mac, p.group()) else {
            return;
        };
        let Some(vlan) = g.classify(None) else { return };
        let mut s = self.snoop.lock();
        let a = match s.assoc.get_mut(&id) {
            Some(a) if !a.associated => {
                a.associated = true;
                a.clone()
            }
            Some(_) => return,
            None => {
                // A port nobody pre-associated (a VM defined before this
                // host knew of associations): a new VM.
                s.assoc.insert(
                    id,
                    PortAssoc {
                        migrated: false,
                        handover: None,
                        associated: true,
                        guard_open: false,
                        seen_ip: None,
                    },
                );
                s.counters.associations += 1;
                return;
            }
        };
        s.counters.associations += 1;
        if !a.migrated {
            s.note(&p.name, "associated (new VM: no state to rebuild)".into());
            return;
        }
        s.counters.migrated_associations += 1;
        let mut installed = 0;
        let mut client_id = None;
        let mut servers = Vec::new();
        let mut ip_hint = None;
        if let Some(h) = &a.handover {
            for rec in &h.bindings {
                if rec.mac != mac {
                    continue;
                }
                let mut rec = rec.clone();
                rec.vlan = vlan;
                if let Some(c) = &rec.client_id {
                    client_id = decode_hex(c);
                }
                if let Some(sv) = rec.server {
                    servers.push(sv);
                }
                ip_hint = Some(rec.ip);
                match s.bindings.install(&rec, id, now) {
                    Snooped::Installed(_) | Snooped::Renewed(_) => installed += 1,
                    Snooped::TableFull => s.counters.binding_table_full += 1,
                    _ => {}
                }
            }
            for &group in &h.groups {
                s.groups.join(vlan, group, id, now);
            }
        }
        s.counters.bindings_handed_over += installed;
        let groups = a.handover.as_ref().map_or(0, |h| h.groups.len());
        s.note(
            &p.name,
            format!("associated (migrated): {installed} bindings and {groups} groups handed over"),
        );
        if g.igmp_snooping {
            // Confirm (or learn) the VM's groups now, not at the next
            // general query up to 125 s away.
            if self.query_port(p, &g, vlan, now) {
                s.counters.triggered_queries += 1;
                s.counters.igmp_queries_sent += 1;
                s.note(&p.name, "IGMP query sent to the migrated VM's port".into());
            }
        }
        if g.dhcp_snooping && s.bindings.get(vlan, mac, now).is_none() {
            if g.ip_source_guard && g.unknown_lease == UnknownLease::Open {
                if let Some(a) = s.assoc.get_mut(&id) {
                    a.guard_open = true;
                }
            }
            for sv in &g.dhcp_servers {
                if !servers.contains(sv) {
                    servers.push(*sv);
                }
            }
            if s.requests.len() < REQUESTS_QUEUED {
                s.counters.lease_refreshes_asked += 1;
                s.requests.push_back(SnoopRequest::LeaseRefresh {
                    port: id,
                    port_name: p.name.clone(),
                    mac,
                    vlan,
                    client_id,
                    servers,
                    ip_hint,
                });
                s.note(&p.name, "no binding came with the VM: asking DHCP".into());
            }
        }
    }

    /// Sends a general query to one port (tagged as its group says).
    fn query_port(&self, p: &Port, g: &PortGroup, vlan: u16, now: Instant) -> bool {
        let Some(tag) = g.egress_tagging(vlan) else {
            return false;
        };
        if g.blocked || !p.up.load(Ordering::Relaxed) {
            return false;
        }
        let q =
            igmp::general_query_frame(QUERIER_MAC, Ipv4Addr::UNSPECIFIED, TRIGGERED_MAX_RESP_DS);
        let out = if tag { frame::push_tag(&q, vlan) } else { q };
        p.send(Packet::plain(out), now);
        true
    }

    /// VDP de-associate: the VM left this host (or is gone). Its port's
    /// bindings and memberships are removed and returned.
    pub fn de_associate(&self, id: PortId) -> NicNetState {
        if let Some(p) = self.port(id) {
            p.arriving.store(false, Ordering::Release);
        }
        let state = self.net_state(id);
        let name = self.port(id).map(|p| p.name.clone()).unwrap_or_default();
        let mut s = self.snoop.lock();
        s.forget_port(id);
        s.counters.de_associations += 1;
        s.note(
            &name,
            format!(
                "de-associated: {} bindings and {} groups removed",
                state.bindings.len(),
                state.groups.len()
            ),
        );
        state
    }

    /// The NIC's bindings and memberships, to hand over with the VM.
    pub fn net_state(&self, id: PortId) -> NicNetState {
        let now = Instant::now();
        let mac = self.port(id).and_then(|p| p.mac).unwrap_or_default();
        let s = self.snoop.lock();
        let mut groups: Vec<Ipv4Addr> = s
            .groups
            .groups_of_port(id, now)
            .into_iter()
            .map(|(_, g)| g)
            .collect();
        groups.sort();
        groups.dedup();
        NicNetState {
            mac,
            bindings: s.bindings.of_port(id, now),
            groups,
        }
    }

    /// A lease the host's lease query found for a VM port.
    pub fn install_lease(&self, id: PortId, rec: &BindingRecord) {
        let Some(p) = self.port(id) else { return };
        let mut s = self.snoop.lock();
        let r = s.bindings.install(rec, id, Instant::now());
        if matches!(r, Snooped::Installed(_) | Snooped::Renewed(_)) {
            s.counters.bindings_from_lease_query += 1;
        }
        self.after_snooped(&mut s, id, &p.name, r, "lease query");
    }

    /// Nobody could vouch for a migrated VM's lease: the port group's
    /// `unknown_lease` policy stands (IP source guard open or closed until
    /// the VM's own DHCP exchange).
    pub fn lease_unknown(&self, id: PortId, why: &str) {
        let Some(p) = self.port(id) else { return };
        let policy = p.group().map(|g| (g.ip_source_guard, g.unknown_lease));
        let mut s = self.snoop.lock();
        s.counters.leases_unknown += 1;
        let what = match policy {
            Some((true, UnknownLease::Open)) => {
                "IP source guard open until the VM's next DHCP exchange"
            }
            Some((true, UnknownLease::Block)) => {
                "IP source guard holds the VM to DHCP until its next exchange"
            }
            _ => "no source guard: the VM sends as before",
        };
        s.note(&p.name, format!("lease unknown ({why}): {what}"));
    }

    /// The last IPv4 address the VM on `id` was seen to send from (where
    /// its group's source guard looks): an assisted renewal's hint when
    /// no handover named it.
    pub fn seen_ip(&self, id: PortId) -> Option<Ipv4Addr> {
        self.snoop.lock().assoc.get(&id).and_then(|a| a.seen_ip)
    }

    /// What the host's I/O side should do now (lease queries).
    pub fn take_snoop_requests(&self) -> Vec<SnoopRequest> {
        self.snoop.lock().requests.drain(..).collect()
    }

    pub fn snooping_stats(&self) -> SnoopingStats {
        let now = Instant::now();
        let names: HashMap<PortId, String> = self
            .ports
            .read()
            .iter()
            .map(|(id, p)| (*id, p.name.clone()))
            .collect();
        let s = self.snoop.lock();
        let mut associations: Vec<AssociationView> = s
            .assoc
            .iter()
            .map(|(id, a)| AssociationView {
                port: names.get(id).cloned().unwrap_or_default(),
                migrated: a.migrated,
                associated: a.associated,
                guard_open: a.guard_open,
            })
            .collect();
        associations.sort_by(|a, b| a.port.cmp(&b.port));
        SnoopingStats {
            bindings: s.bindings.records(now),
            groups: s.groups.entries(now),
            associations,
            counters: s.counters.clone(),
            log: s.log.iter().cloned().collect(),
        }
    }

    /// Ages bindings and memberships, and queries VM ports that snoop
    /// IGMP in VLANs where no router does (a querier where none exists).
    pub(super) fn snoop_age(&self, now: Instant) {
        self.expire_moves(now);
        let mut s = self.snoop.lock();
        s.bindings.age(now);
        s.groups.age(now);
        if !self.any_igmp.load(Ordering::Acquire) {
            return;
        }
        let ports = self.ports.read();
        let mut due: Vec<u16> = Vec::new();
        for p in ports.values() {
            let PortKind::Vm { .. } = p.kind else {
                continue;
            };
            let Some(g) = p.group() else { continue };
            if !g.igmp_snooping {
                continue;
            }
            let Some(vlan) = g.classify(None) else {
                continue;
            };
            if due.contains(&vlan) || s.groups.has_querier(vlan, now) {
                continue;
            }
            // A VLAN first seen now is queried one interval from now: its
            // VMs' joins were reported as they happened, and a query at
            // once would be indistinguishable from a triggered one.
            let last = *s.last_query.entry(vlan).or_insert(now);
            if now.duration_since(last) >= QUERY_INTERVAL {
                due.push(vlan);
            }
        }
        for vlan in due {
            s.last_query.insert(vlan, now);
            for p in ports.values() {
                let Some(g) = p.group() else { continue };
                if !p.is_vm() || !g.igmp_snooping || g.classify(None) != Some(vlan) {
                    continue;
                }
                if self.query_port(p, &g, vlan, now) {
                    s.counters.igmp_queries_sent += 1;
                }
            }
        }
    }
}

impl Switch {
    /// A VM port's migration started: see [`Port::departing`].
    pub fn switchover_hold(&self, id: PortId) {
        if let Some(p) = self.port(id) {
            p.announced_away.store(false, Ordering::Release);
            p.departing.store(true, Ordering::Release);
        }
    }

    /// Whether the VM on `id` is migrating here and its rings have not
    /// run yet: what arrives for it is kept (the host's I/O side must
    /// keep its queue too).
    pub fn is_arriving(&self, id: PortId) -> bool {
        self.port(id)
            .is_some_and(|p| p.arriving.load(Ordering::Acquire))
    }

    /// Whether the VM on `id` is migrating away (its frames are held).
    pub fn is_departing(&self, id: PortId) -> bool {
        self.port(id)
            .is_some_and(|p| p.departing.load(Ordering::Acquire))
    }

    /// The pinned `mac` of the VM on `id` arrived through an uplink: if
    /// that VM is departing, the network beyond now sends its traffic to
    /// its new host.
    pub(super) fn announced_away(&self, id: PortId, mac: Mac) {
        if let Some(p) = self.port(id) {
            if p.departing.load(Ordering::Acquire) && p.mac == Some(mac) {
                p.announced_away.store(true, Ordering::Release);
            }
        }
    }

    /// A unicast frame for a moved VM whose new host has not announced it
    /// yet: kept with the frames held for it (`None`), or handed back.
    pub(super) fn hold_for_move(&self, dst: Mac, vlan: u16, packet: Packet) -> Option<Packet> {
        let mut s = self.snoop.lock();
        let Some(m) = s.pending_moves.get_mut(&dst) else {
            return Some(packet);
        };
        if m.frames.len() >= m.limit {
            m.port.counters.dropped(DropReason::QueueFull);
        } else {
            m.frames.push_back((vlan, packet));
        }
        None
    }

    /// Forwards what was held for the moved VM with `mac`, if any, in
    /// order: out of the uplinks, where the network now finds the VM.
    pub(super) fn finish_move(&self, mac: Mac, why: &str, now: Instant) {
        let m = {
            let mut s = self.snoop.lock();
            let Some(m) = s.pending_moves.remove(&mac) else {
                return;
            };
            self.pending_moves.fetch_sub(1, Ordering::AcqRel);
            m
        };
        let n = m.frames.len();
        for (vlan, packet) in m.frames {
            self.forward(m.id, &m.port, vlan, packet, now);
        }
        let waited = now.saturating_duration_since(m.since).as_millis();
        let mut s = self.snoop.lock();
        s.counters.switchover_forwarded += n as u64;
        s.note(
            &m.port.name,
            format!("switchover done: {n} frames that arrived meanwhile forwarded to the VM's new host ({why}, after {waited} ms)"),
        );
    }

    /// Moves whose VM was not announced within the bound: their frames go
    /// now (flooded out of the uplinks, as for any unknown address).
    pub(super) fn expire_moves(&self, now: Instant) {
        if self.pending_moves.load(Ordering::Acquire) == 0 {
            return;
        }
        let late: Vec<Mac> = self
            .snoop
            .lock()
            .pending_moves
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.since) >= MOVE_ANNOUNCE_BOUND)
            .map(|(mac, _)| *mac)
            .collect();
        for mac in late {
            self.finish_move(mac, "not announced within the bound", now);
        }
    }

    /// The VM runs on its new host: its address is no longer here, and the
    /// frames queued for it during the switchover are forwarded again, in
    /// order, out of the uplinks to where it now is. If the network beyond
    /// has not heard from the VM's new host yet (its announcement has not
    /// come back through an uplink), it would send them straight back
    /// here, so they wait, with any that still arrive for the VM, until
    /// the announcement arrives or [`MOVE_ANNOUNCE_BOUND`] passes.
    /// Returns how many were held.
    pub fn switchover_moved(&self, id: PortId) -> usize {
        let Some(p) = self.port(id) else { return 0 };
        p.departing.store(false, Ordering::Release);
        p.up.store(false, Ordering::Relaxed);
        self.fdb.lock().flush_port(id);
        let Some(g) = p.group() else { return 0 };
        let now = Instant::now();
        let mut held = VecDeque::new();
        // Bounded by the queue's own bound: nothing refills it, the port
        // is down and no longer departing.
        while let Some(packet) = p.egress.pop() {
            let Some(info) = frame::parse(&packet.frame) else {
                continue;
            };
            // Only what was sent to the VM itself follows it: broadcast
            // and multicast were flooded to everyone else when they came,
            // and a second copy would reach them twice and go back out
            // of the uplink they came in by.
            if info.dst.is_group() {
                continue;
            }
            let Some(vlan) = g.classify(info.vid) else {
                continue;
            };
            let frame = if info.vid.is_some() {
                frame::pop_tag(&packet.frame)
            } else {
                packet.frame
            };
            held.push_back((
                vlan,
                Packet {
                    frame,
                    offload: packet.offload,
                },
            ));
        }
        let n = held.len();
        let announced = p.announced_away.swap(false, Ordering::AcqRel);
        match p.mac {
            Some(mac) => {
                let limit = p.egress.capacity().max(n);
                let mut s = self.snoop.lock();
                if s.pending_moves
                    .insert(
                        mac,
                        PendingMove {
                            port: p.clone(),
                            id,
                            since: now,
                            frames: held,
                            limit,
                        },
                    )
                    .is_none()
                {
                    self.pending_moves.fetch_add(1, Ordering::AcqRel);
                }
                drop(s);
                if announced {
                    self.finish_move(
                        mac,
                        "announced from its new host before the switchover ended",
                        now,
                    );
                }
            }
            None => {
                // No fixed address to recognise an announcement by.
                for (vlan, packet) in held {
                    self.forward(id, &p, vlan, packet, now);
                }
                let mut s = self.snoop.lock();
                s.counters.switchover_forwarded += n as u64;
                s.note(
                    &p.name,
                    format!("switchover done: {n} frames that arrived meanwhile forwarded to the VM's new host"),
                );
            }
        }
        n
    }

    /// The VM stays (its migration failed or was cancelled): the frames
    /// queued meanwhile are delivered to it as its rings run again.
    /// Returns how many wait for it.
    pub fn switchover_stay(&self, id: PortId) -> usize {
        let Some(p) = self.port(id) else { return 0 };
        p.departing.store(false, Ordering::Release);
        let n = p.egress.len();
        let mut s = self.snoop.lock();
        s.counters.switchover_delivered += n as u64;
        if n > 0 {
            s.note(
                &p.name,
                format!("the VM stays: {n} frames that arrived during the switchover wait for it"),
            );
        }
        n
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}
