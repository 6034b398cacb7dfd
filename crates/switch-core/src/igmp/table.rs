//! The snooping table: which ports want which groups, per VLAN, and which
//! ports lead to multicast routers. Time is passed in, so the table is pure
//! and testable.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::wire::{is_link_local_group, GroupRecord, IgmpMessage};
use crate::port::PortId;

/// Sources remembered per (VLAN, group, port) for an IGMPv3 INCLUDE-mode
/// member. Beyond this the member counts as wanting any source: it then
/// leaves by report or expiry rather than by BLOCK, which costs only
/// traffic it would have been sent anyway, while a guest cannot grow the
/// table without bound.
pub const MAX_TRACKED_SOURCES: usize = 64;

/// What a message (or one v3 record) did to the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The port is (still) a member; `new` if it was not one before.
    Joined { group: Ipv4Addr, new: bool },
    /// The port stopped being a member.
    Left { group: Ipv4Addr },
    /// A query: the port is now a router port in that VLAN.
    Query { general: bool },
    /// Nothing forwarding sees changed: link-local or non-multicast groups,
    /// leaves from non-members, BLOCKs that leave sources, unknown records.
    Ignored,
    /// Not joined: the table holds its limit of live entries.
    TableFull,
}

/// One group of one VLAN, as shown to operators and handed over with a
/// migrating VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMembership {
    pub vlan: u16,
    pub group: Ipv4Addr,
    pub ports: Vec<PortId>,
    /// Seconds until each port's membership expires, in `ports`' order.
    pub expires_in_s: Vec<u64>,
}

#[derive(Debug, Clone)]
struct Member {
    /// Last report; the membership lasts `membership_interval` from here.
    seen: Instant,
    /// IGMPv3 INCLUDE mode: the sources asked for, kept only to tell when
    /// a BLOCK leaves none. `None`: any source (EXCLUDE mode, v1/v2).
    include: Option<BTreeSet<Ipv4Addr>>,
}

/// What a report asks of one (group, port).
enum Action {
    /// Any source: v1/v2 reports, EXCLUDE records, handed-over membership.
    Any,
    /// IS_INCLUDE / TO_INCLUDE with sources: exactly these.
    Include(Vec<Ipv4Addr>),
    /// ALLOW: these as well.
    Allow(Vec<Ipv4Addr>),
    /// BLOCK: not these any more.
    Block(Vec<Ipv4Addr>),
    /// Leave, or INCLUDE of nothing.
    Stop,
}

impl Action {
    fn of_record(r: &GroupRecord) -> Option<Action> {
        let s = || r.sources.clone();
        Some(match r.record_type {
            GroupRecord::MODE_IS_EXCLUDE | GroupRecord::CHANGE_TO_EXCLUDE => Action::Any,
            GroupRecord::MODE_IS_INCLUDE | GroupRecord::CHANGE_TO_INCLUDE => {
                if r.sources.is_empty() {
                    Action::Stop
                } else {
                    Action::Include(s())
                }
            }
            GroupRecord::ALLOW_NEW_SOURCES if !r.sources.is_empty() => Action::Allow(s()),
            GroupRecord::BLOCK_OLD_SOURCES if !r.sources.is_empty() => Action::Block(s()),
            _ => return None,
        })
    }
}

fn capped(set: BTreeSet<Ipv4Addr>) -> Option<BTreeSet<Ipv4Addr>> {
    (set.len() <= MAX_TRACKED_SOURCES).then_some(set)
}

#[derive(Debug)]
pub struct MembershipTable {
    groups: BTreeMap<(u16, Ipv4Addr), BTreeMap<PortId, Member>>,
    /// (VLAN, group, port) entries in `groups`, live or not yet aged.
    len: usize,
    limit: usize,
    membership_interval: Duration,
    router_timeout: Duration,
    static_routers: BTreeSet<PortId>,
    /// When a query was last heard on a port, per VLAN.
    dynamic_routers: BTreeMap<(u16, PortId), Instant>,
}

impl MembershipTable {
    /// `limit`: (vlan, group, port) entries at most. `membership_interval`:
    /// how long a report counts (RFC 3376's default is 260 s).
    /// `router_timeout`: how long a port stays a router port after a query
    /// was heard on it (RFC 4541 suggests the other-querier-present
    /// interval, 255 s).
    pub fn new(limit: usize, membership_interval: Duration, router_timeout: Duration) -> Self {
        Self {
            groups: BTreeMap::new(),
            len: 0,
            limit,
            membership_interval,
            router_timeout,
            static_routers: BTreeSet::new(),
            dynamic_routers: BTreeMap::new(),
        }
    }

    /// (VLAN, group, port) entries held, including expired ones not yet
    /// aged out; never more than the limit.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn live(&self, m: &Member, now: Instant) -> bool {
        now.duration_since(m.seen) < self.membership_interval
    }

    fn router_live(&self, heard: Instant, now: Instant) -> bool {
        now.duration_since(heard) < self.router_timeout
    }

    /// A message received on `port` in `vlan`. Reports (v1/v2, and v3
    /// records that want traffic) join or refresh; a v2 leave, a v3
    /// INCLUDE of nothing, or a BLOCK of every source the port included
    /// removes the port from the group at once (fast leave: a VM port has
    /// one host behind it, so no group-specific query is needed to find
    /// other members). A query makes the port a router port in `vlan`
    /// until `router_timeout`. Link-local and non-multicast groups are
    /// never recorded.
    ///
    /// For a v3 report the most telling of its records' outcomes:
    /// `TableFull`, then a new join, a leave, a refresh, `Ignored`; see
    /// [`Self::observe_each`] for all of them.
    pub fn observe(
        &mut self,
        vlan: u16,
        port: PortId,
        msg: &IgmpMessage,
        now: Instant,
    ) -> Observed {
        let all = self.observe_each(vlan, port, msg, now);
        let rank = |o: &Observed| match o {
            Observed::TableFull => 0,
            Observed::Joined { new: true, .. } => 1,
            Observed::Left { .. } => 2,
            Observed::Joined { new: false, .. } => 3,
            Observed::Query { .. } => 4,
            Observed::Ignored => 5,
        };
        all.into_iter()
            .min_by_key(rank)
            .unwrap_or(Observed::Ignored)
    }

    /// As [`Self::observe`], with one outcome per v3 record (one for any
    /// other message; none for a v3 report without records).
    pub fn observe_each(
        &mut self,
        vlan: u16,
        port: PortId,
        msg: &IgmpMessage,
        now: Instant,
    ) -> Vec<Observed> {
        match msg {
            IgmpMessage::Query { group, .. } => {
                self.dynamic_routers.insert((vlan, port), now);
                vec![Observed::Query {
                    general: group.is_unspecified(),
                }]
            }
            IgmpMessage::Report { group, .. } => {
                vec![self.apply(vlan, *group, port, Action::Any, now)]
            }
            IgmpMessage::Leave { group } => {
                vec![self.apply(vlan, *group, port, Action::Stop, now)]
            }
            IgmpMessage::ReportV3 { records } => records
                .iter()
                .map(|r| match Action::of_record(r) {
                    Some(a) => self.apply(vlan, r.group, port, a, now),
                    None => Observed::Ignored,
                })
                .collect(),
        }
    }

    /// Installs membership handed over from another host (a migrating
    /// VM's): joined as if reported now, for any source.
    pub fn join(&mut self, vlan: u16, group: Ipv4Addr, port: PortId, now: Instant) -> Observed {
        self.apply(vlan, group, port, Action::Any, now)
    }

    fn apply(
        &mut self,
        vlan: u16,
        group: Ipv4Addr,
        port: PortId,
        action: Action,
        now: Instant,
    ) -> Observed {
        if !group.is_multicast() || is_link_local_group(group) {
            return Observed::Ignored;
        }
        let key = (vlan, group);
        let existing = self
            .groups
            .get(&key)
            .and_then(|ports| ports.get(&port))
            .map(|m| (self.live(m, now), m.include.clone()));
        let was_member = matches!(existing, Some((true, _)));
        let absent = existing.is_none();
        let include = match action {
            Action::Stop => {
                self.remove_one(key, port);
                return if was_member {
                    Observed::Left { group }
                } else {
                    Observed::Ignored
                };
            }
            Action::Block(sources) => {
                let Some((true, Some(mut set))) = existing else {
                    // Not a member, or one taking any source: BLOCK says
                    // nothing about wanting the group.
                    return Observed::Ignored;
                };
                for s in &sources {
                    set.remove(s);
                }
                if set.is_empty() {
                    self.remove_one(key, port);
                    return Observed::Left { group };
                }
                if let Some(m) = self.groups.get_mut(&key).and_then(|p| p.get_mut(&port)) {
                    // Not a refresh: RFC 3376 6.4.2 leaves the group timer.
                    m.include = Some(set);
                }
                return Observed::Ignored;
            }
            Action::Any => None,
            Action::Include(sources) => capped(sources.into_iter().collect()),
            Action::Allow(sources) => match existing {
                Some((true, None)) => None,
                Some((true, Some(mut set))) => {
                    set.extend(sources);
                    capped(set)
                }
                _ => capped(sources.into_iter().collect()),
            },
        };
        if absent && self.len >= self.limit {
            // Make room from expired entries before refusing.
            self.age(now);
            if self.len >= self.limit {
                return Observed::TableFull;
            }
        }
        let member = Member { seen: now, include };
        if self
            .groups
            .entry(key)
            .or_default()
            .insert(port, member)
            .is_none()
        {
            self.len += 1;
        }
        Observed::Joined {
            group,
            new: !was_member,
        }
    }

    fn remove_one(&mut self, key: (u16, Ipv4Addr), port: PortId) {
        if let Some(ports) = self.groups.get_mut(&key) {
            if ports.remove(&port).is_some() {
                self.len -= 1;
            }
            if ports.is_empty() {
                self.groups.remove(&key);
            }
        }
    }

    /// A port that always counts as a router port in every VLAN (the switch
    /// marks its uplinks this way), or stops being one.
    pub fn set_static_router(&mut self, port: PortId, on: bool) {
        if on {
            self.static_routers.insert(port);
        } else {
            self.static_routers.remove(&port);
        }
    }

    fn router_ports(&self, vlan: u16, now: Instant) -> impl Iterator<Item = PortId> + '_ {
        let dynamic = self
            .dynamic_routers
            .range((vlan, PortId::MIN)..=(vlan, PortId::MAX))
            .filter(move |(_, &heard)| self.router_live(heard, now))
            .map(|(&(_, p), _)| p);
        self.static_routers.iter().copied().chain(dynamic)
    }

    /// The router ports of `vlan`, sorted: where hosts' reports and leaves
    /// go (RFC 4541 2.1.1), not to the other hosts, whose v1/v2 report
    /// suppression would otherwise hide them from the switch.
    pub fn routers(&self, vlan: u16, now: Instant) -> Vec<PortId> {
        let out: BTreeSet<PortId> = self.router_ports(vlan, now).collect();
        out.into_iter().collect()
    }

    /// Where a frame for `group` in `vlan` goes: the live members and the
    /// router ports of `vlan` (static ones count in every VLAN, dynamic
    /// ones only where their query was heard), sorted; just the router
    /// ports for a group without members (RFC 4541 2.1.2: routers need all
    /// multicast). `None` for link-local and non-multicast groups, which
    /// the caller floods. The caller removes the ingress port.
    pub fn targets(&self, vlan: u16, group: Ipv4Addr, now: Instant) -> Option<Vec<PortId>> {
        if !group.is_multicast() || is_link_local_group(group) {
            return None;
        }
        let mut out: BTreeSet<PortId> = self.router_ports(vlan, now).collect();
        if let Some(ports) = self.groups.get(&(vlan, group)) {
            out.extend(
                ports
                    .iter()
                    .filter(|(_, m)| self.live(m, now))
                    .map(|(&p, _)| p),
            );
        }
        Some(out.into_iter().collect())
    }

    /// The live groups `port` is a member of, for handing over with a
    /// migrating VM.
    pub fn groups_of_port(&self, port: PortId, now: Instant) -> Vec<(u16, Ipv4Addr)> {
        self.groups
            .iter()
            .filter(|(_, ports)| ports.get(&port).is_some_and(|m| self.live(m, now)))
            .map(|(&key, _)| key)
            .collect()
    }

    /// Forgets `port` (it went down or was removed): its memberships, and
    /// it as a router port, static or dynamic. Returns the memberships
    /// dropped.
    pub fn remove_port(&mut self, port: PortId) -> usize {
        let mut gone = 0;
        self.groups.retain(|_, ports| {
            if ports.remove(&port).is_some() {
                gone += 1;
            }
            !ports.is_empty()
        });
        self.len -= gone;
        self.static_routers.remove(&port);
        self.dynamic_routers.retain(|&(_, p), _| p != port);
        gone
    }

    /// Drops expired memberships and dynamic router ports; returns the
    /// memberships dropped.
    pub fn age(&mut self, now: Instant) -> usize {
        let interval = self.membership_interval;
        let mut gone = 0;
        self.groups.retain(|_, ports| {
            ports.retain(|_, m| {
                let keep = now.duration_since(m.seen) < interval;
                gone += usize::from(!keep);
                keep
            });
            !ports.is_empty()
        });
        self.len -= gone;
        let timeout = self.router_timeout;
        self.dynamic_routers
            .retain(|_, heard| now.duration_since(*heard) < timeout);
        gone
    }

    /// The live memberships, by VLAN and group.
    pub fn entries(&self, now: Instant) -> Vec<GroupMembership> {
        self.groups
            .iter()
            .filter_map(|(&(vlan, group), ports)| {
                let live: Vec<(PortId, u64)> = ports
                    .iter()
                    .filter(|(_, m)| self.live(m, now))
                    .map(|(&p, m)| {
                        let left = self
                            .membership_interval
                            .saturating_sub(now.duration_since(m.seen));
                        (p, left.as_secs())
                    })
                    .collect();
                (!live.is_empty()).then(|| GroupMembership {
                    vlan,
                    group,
                    ports: live.iter().map(|&(p, _)| p).collect(),
                    expires_in_s: live.iter().map(|&(_, s)| s).collect(),
                })
            })
            .collect()
    }

    /// Whether a query was heard in `vlan` within the router timeout: some
    /// router other than the switch is querying there.
    pub fn has_querier(&self, vlan: u16, now: Instant) -> bool {
        self.dynamic_routers
            .range((vlan, PortId::MIN)..=(vlan, PortId::MAX))
            .any(|(_, &heard)| self.router_live(heard, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
    const H: Ipv4Addr = Ipv4Addr::new(239, 2, 2, 2);
    const MEMBERSHIP: Duration = Duration::from_secs(260);
    const ROUTER: Duration = Duration::from_secs(255);

    fn table(limit: usize) -> MembershipTable {
        MembershipTable::new(limit, MEMBERSHIP, ROUTER)
    }

    fn v2(group: Ipv4Addr) -> IgmpMessage {
        IgmpMessage::Report { version: 2, group }
    }

    fn v3(record_type: u8, group: Ipv4Addr, sources: &[[u8; 4]]) -> IgmpMessage {
        IgmpMessage::ReportV3 {
            records: vec![GroupRecord {
                record_type,
                group,
                sources: sources.iter().map(|&o| Ipv4Addr::from(o)).collect(),
            }],
        }
    }

    fn general_query() -> IgmpMessage {
        IgmpMessage::Query {
            version: 3,
            group: Ipv4Addr::UNSPECIFIED,
            max_resp_ds: 100,
        }
    }

    #[test]
    fn join_refresh_and_expiry() {
        let t0 = Instant::now();
        let mut t = table(10);
        assert_eq!(
            t.observe(1, 5, &v2(G), t0),
            Observed::Joined {
                group: G,
                new: true
            }
        );
        assert_eq!(t.targets(1, G, t0), Some(vec![5]));
        let t1 = t0 + Duration::from_secs(200);
        assert_eq!(
            t.observe(
                1,
                5,
                &IgmpMessage::Report {
                    version: 1,
                    group: G
                },
                t1
            ),
            Observed::Joined {
                group: G,
                new: false
            }
        );
        let t2 = t0 + Duration::from_secs(300);
        assert_eq!(t.targets(1, G, t2), Some(vec![5]), "refreshed at t1");
        assert_eq!(t.entries(t2)[0].expires_in_s, vec![160]);
        let t3 = t1 + MEMBERSHIP;
        assert_eq!(t.targets(1, G, t3), Some(vec![]), "expired");
        assert!(t.entries(t3).is_empty());
        assert!(t.groups_of_port(5, t3).is_empty());
        assert_eq!(t.len(), 1, "until aged");
        assert_eq!(t.age(t3), 1);
        assert!(t.is_empty());
        assert_eq!(
            t.observe(1, 5, &v2(G), t3),
            Observed::Joined {
                group: G,
                new: true
            }
        );
    }

    #[test]
    fn v2_leave_is_fast() {
        let t0 = Instant::now();
        let mut t = table(10);
        t.observe(1, 5, &v2(G), t0);
        t.observe(1, 6, &v2(G), t0);
        assert_eq!(
            t.observe(1, 5, &IgmpMessage::Leave { group: G }, t0),
            Observed::Left { group: G }
        );
        assert_eq!(t.targets(1, G, t0), Some(vec![6]));
        assert_eq!(
            t.observe(1, 5, &IgmpMessage::Leave { group: G }, t0),
            Observed::Ignored,
            "not a member any more"
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn v3_records_join_and_leave() {
        let t0 = Instant::now();
        let mut t = table(10);
        // TO_EX({}) is a join, TO_IN({}) a leave.
        assert_eq!(
            t.observe(1, 5, &v3(4, G, &[]), t0),
            Observed::Joined {
                group: G,
                new: true
            }
        );
        assert_eq!(
            t.observe(1, 5, &v3(3, G, &[]), t0),
            Observed::Left { group: G }
        );
        // IS_EX, and IS_IN with sources, join; IS_IN({}) leaves.
        assert_eq!(
            t.observe(1, 5, &v3(2, G, &[]), t0),
            Observed::Joined {
                group: G,
                new: true
            }
        );
        assert_eq!(
            t.observe(1, 5, &v3(1, G, &[]), t0),
            Observed::Left { group: G }
        );
        assert_eq!(
            t.observe(1, 5, &v3(1, G, &[[10, 0, 0, 1]]), t0),
            Observed::Joined {
                group: G,
                new: true
            }
        );
        // INCLUDE {1}: ALLOW {2} then BLOCK {1} keeps it, BLOCK {2} leaves.
        assert_eq!(
            t.observe(1, 5, &v3(5, G, &[[10, 0, 0, 2]]), t0),
            Observed::Joined {
                group: G,
                new: false
            }
        );
        assert_eq!(
            t.observe(1, 5, &v3(6, G, &[[10, 0, 0, 1]]), t0),
            Observed::Ignored
        );
        assert_eq!(t.targets(1, G, t0), Some(vec![5]));
        assert_eq!(
            t.observe(1, 5, &v3(6, G, &[[10, 0, 0, 2]]), t0),
            Observed::Left { group: G }
        );
        // In EXCLUDE mode a BLOCK only excludes more: still a member.
        t.observe(1, 5, &v3(4, G, &[]), t0);
        assert_eq!(
            t.observe(1, 5, &v3(6, G, &[[10, 0, 0, 1]]), t0),
            Observed::Ignored
        );
        assert_eq!(t.targets(1, G, t0), Some(vec![5]));
        // ALLOW from a non-member joins; unknown record types do nothing.
        assert_eq!(
            t.observe(1, 6, &v3(5, G, &[[10, 0, 0, 3]]), t0),
            Observed::Joined {
                group: G,
                new: true
            }
        );
        assert_eq!(t.observe(1, 7, &v3(9, G, &[]), t0), Observed::Ignored);
        assert_eq!(t.observe(1, 7, &v3(5, G, &[]), t0), Observed::Ignored);
        assert_eq!(t.targets(1, G, t0), Some(vec![5, 6]));
    }

    #[test]
    fn v3_report_with_many_records() {
        let t0 = Instant::now();
        let mut t = table(10);
        let msg = IgmpMessage::ReportV3 {
            records: vec![
                GroupRecord {
                    record_type: GroupRecord::CHANGE_TO_EXCLUDE,
                    group: G,
                    sources: vec![],
                },
                GroupRecord {
                    record_type: GroupRecord::MODE_IS_EXCLUDE,
                    group: H,
                    sources: vec![],
                },
            ],
        };
        assert_eq!(t.observe_each(1, 5, &msg, t0).len(), 2);
        assert_eq!(t.groups_of_port(5, t0), vec![(1, G), (1, H)]);
        let leave_g = IgmpMessage::ReportV3 {
            records: vec![
                GroupRecord {
                    record_type: GroupRecord::MODE_IS_EXCLUDE,
                    group: H,
                    sources: vec![],
                },
                GroupRecord {
                    record_type: GroupRecord::CHANGE_TO_INCLUDE,
                    group: G,
                    sources: vec![],
                },
            ],
        };
        assert_eq!(t.observe(1, 5, &leave_g, t0), Observed::Left { group: G });
        assert_eq!(t.groups_of_port(5, t0), vec![(1, H)]);
    }

    #[test]
    fn wants_traffic_per_record_type() {
        let r = |record_type, n: usize| GroupRecord {
            record_type,
            group: G,
            sources: vec![Ipv4Addr::new(10, 0, 0, 1); n],
        };
        assert!(r(2, 0).wants_traffic() && r(4, 0).wants_traffic() && r(4, 3).wants_traffic());
        assert!(r(1, 1).wants_traffic() && r(3, 1).wants_traffic() && r(5, 1).wants_traffic());
        assert!(!r(1, 0).wants_traffic() && !r(3, 0).wants_traffic());
        assert!(!r(5, 0).wants_traffic() && !r(6, 1).wants_traffic() && !r(0, 0).wants_traffic());
    }

    #[test]
    fn limit_holds_and_expired_entries_make_room() {
        let t0 = Instant::now();
        let mut t = table(2);
        t.observe(1, 1, &v2(G), t0);
        t.observe(1, 2, &v2(G), t0);
        assert_eq!(t.observe(1, 3, &v2(G), t0), Observed::TableFull);
        assert_eq!(t.join(1, H, 1, t0), Observed::TableFull);
        assert_eq!(
            t.observe(1, 1, &v2(G), t0),
            Observed::Joined {
                group: G,
                new: false
            },
            "refreshing needs no room"
        );
        let later = t0 + MEMBERSHIP;
        assert_eq!(
            t.observe(1, 3, &v2(G), later),
            Observed::Joined {
                group: G,
                new: true
            }
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn router_ports_static_and_dynamic() {
        let t0 = Instant::now();
        let mut t = table(10);
        t.set_static_router(100, true);
        assert_eq!(
            t.targets(1, G, t0),
            Some(vec![100]),
            "unknown group: routers"
        );
        assert_eq!(t.targets(7, G, t0), Some(vec![100]), "static: every VLAN");
        assert!(!t.has_querier(1, t0));
        assert_eq!(
            t.observe(1, 9, &general_query(), t0),
            Observed::Query { general: true }
        );
        let specific = IgmpMessage::Query {
            version: 2,
            group: G,
            max_resp_ds: 10,
        };
        assert_eq!(
            t.observe(3, 8, &specific, t0),
            Observed::Query { general: false }
        );
        assert!(t.has_querier(1, t0) && t.has_querier(3, t0) && !t.has_querier(2, t0));
        t.observe(1, 5, &v2(G), t0);
        assert_eq!(t.targets(1, G, t0), Some(vec![5, 9, 100]));
        assert_eq!(t.targets(1, H, t0), Some(vec![9, 100]));
        assert_eq!(
            t.targets(2, G, t0),
            Some(vec![100]),
            "dynamic: its VLAN only"
        );
        let later = t0 + ROUTER;
        assert!(!t.has_querier(1, later));
        assert_eq!(t.targets(1, H, later), Some(vec![100]));
        t.set_static_router(100, false);
        assert_eq!(t.targets(1, H, later), Some(vec![]));
        t.set_static_router(100, true);
        t.observe(1, 9, &general_query(), later);
        assert_eq!(t.remove_port(100), 0);
        assert_eq!(t.remove_port(9), 0);
        assert_eq!(
            t.targets(1, H, later),
            Some(vec![]),
            "remove_port forgets routers"
        );
        assert!(!t.has_querier(1, later));
    }

    #[test]
    fn vlans_are_separate() {
        let t0 = Instant::now();
        let mut t = table(10);
        t.observe(1, 5, &v2(G), t0);
        t.observe(2, 6, &v2(G), t0);
        assert_eq!(t.targets(1, G, t0), Some(vec![5]));
        assert_eq!(t.targets(2, G, t0), Some(vec![6]));
        assert_eq!(
            t.observe(2, 5, &IgmpMessage::Leave { group: G }, t0),
            Observed::Ignored
        );
        assert_eq!(t.targets(1, G, t0), Some(vec![5]));
        assert_eq!(t.entries(t0).len(), 2);
    }

    #[test]
    fn link_local_and_unicast_groups_never_recorded() {
        let t0 = Instant::now();
        let mut t = table(10);
        let mdns = Ipv4Addr::new(224, 0, 0, 251);
        assert_eq!(t.observe(1, 5, &v2(mdns), t0), Observed::Ignored);
        assert_eq!(t.observe(1, 5, &v3(4, mdns, &[]), t0), Observed::Ignored);
        assert_eq!(t.join(1, mdns, 5, t0), Observed::Ignored);
        assert_eq!(
            t.observe(1, 5, &v2(Ipv4Addr::new(10, 0, 0, 1)), t0),
            Observed::Ignored
        );
        assert!(t.is_empty());
        assert_eq!(t.targets(1, mdns, t0), None, "flooded");
        assert_eq!(t.targets(1, Ipv4Addr::new(10, 0, 0, 1), t0), None);
    }

    #[test]
    fn handover_and_port_removal() {
        let t0 = Instant::now();
        let mut t = table(10);
        assert_eq!(
            t.join(4, G, 5, t0),
            Observed::Joined {
                group: G,
                new: true
            }
        );
        t.observe(4, 5, &v2(H), t0);
        t.observe(4, 6, &v2(H), t0);
        assert_eq!(t.groups_of_port(5, t0), vec![(4, G), (4, H)]);
        let e = t.entries(t0 + Duration::from_secs(10));
        assert_eq!(
            e,
            vec![
                GroupMembership {
                    vlan: 4,
                    group: G,
                    ports: vec![5],
                    expires_in_s: vec![250]
                },
                GroupMembership {
                    vlan: 4,
                    group: H,
                    ports: vec![5, 6],
                    expires_in_s: vec![250, 250]
                },
            ]
        );
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<GroupMembership>>(&json).unwrap(),
            e
        );
        assert_eq!(t.remove_port(5), 2);
        assert_eq!(t.len(), 1);
        assert_eq!(t.targets(4, G, t0), Some(vec![]));
    }

    proptest! {
        /// Whatever the messages, the table holds at most its limit, its
        /// count matches what it holds, and member sources stay bounded.
        #[test]
        fn never_exceeds_its_limit(ops in proptest::collection::vec(
            (0u8..8, 0u16..3, 0u32..4, 0u8..6, 0u8..8, proptest::collection::vec(0u8..80, 0..70), 0u64..400),
            0..150,
        )) {
            let t0 = Instant::now();
            let limit = 5;
            let mut t = table(limit);
            for (op, vlan, port, g, rt, srcs, secs) in ops {
                let now = t0 + Duration::from_secs(secs);
                let group = Ipv4Addr::new(239, 0, 0, g);
                let sources: Vec<Ipv4Addr> = srcs.iter().map(|&s| Ipv4Addr::new(10, 0, 0, s)).collect();
                match op {
                    0 => { t.observe(vlan, port, &v2(group), now); }
                    1 => { t.observe(vlan, port, &IgmpMessage::Leave { group }, now); }
                    2 | 3 => {
                        let msg = IgmpMessage::ReportV3 {
                            records: vec![GroupRecord { record_type: rt, group, sources }],
                        };
                        t.observe(vlan, port, &msg, now);
                    }
                    4 => { t.join(vlan, group, port, now); }
                    5 => { t.observe(vlan, port, &general_query(), now); }
                    6 => { t.remove_port(port); }
                    _ => { t.age(now); }
                }
                let held: usize = t.groups.values().map(BTreeMap::len).sum();
                prop_assert_eq!(held, t.len());
                prop_assert!(t.len() <= limit);
                prop_assert!(t.groups.values().all(|p| !p.is_empty()));
                for ports in t.groups.values() {
                    for m in ports.values() {
                        prop_assert!(m.include.as_ref().is_none_or(|s| !s.is_empty() && s.len() <= MAX_TRACKED_SOURCES));
                    }
                }
            }
        }
    }
}
