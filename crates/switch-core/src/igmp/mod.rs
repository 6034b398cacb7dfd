//! IGMP snooping (RFC 4541) for IPv4 multicast: which ports of a VLAN want
//! which group, so the switch sends a group's frames to its members and to
//! the multicast routers instead of flooding them.
//!
//! This module owns:
//!
//! - reading IGMPv1/v2/v3 messages (RFC 1112, 2236, 3376) from untrusted
//!   bytes, alone ([`parse_igmp`]) or inside an untagged Ethernet/IPv4
//!   frame ([`parse_frame`]), and the cheap per-frame checks the forwarding
//!   path needs ([`is_igmp`], [`ipv4_multicast_destination`]);
//! - writing the switch's own general query ([`general_query_frame`]) and,
//!   for tests and tools, reports and leaves;
//! - the [`MembershipTable`]: members per (VLAN, group, port) with expiry,
//!   fast leave, a total limit, and the router ports (static uplinks and
//!   ports a query was heard on).
//!
//! It is pure: time is passed in and nothing is sent. Deciding when to
//! query, forwarding reports to router ports, and removing the ingress port
//! from [`MembershipTable::targets`] are the forwarding core's business.
//! Membership is per group: IGMPv3 source lists are only followed far
//! enough to tell when a port stops wanting a group, never to filter
//! traffic by source.

mod table;
mod wire;

pub use table::{GroupMembership, MembershipTable, Observed, MAX_TRACKED_SOURCES};
pub use wire::{
    decode_max_resp, encode_igmp, encode_max_resp, general_query_frame, group_mac,
    ipv4_multicast_destination, is_igmp, is_link_local_group, leave_frame, parse_frame, parse_igmp,
    report_frame, v3_report_frame, GroupRecord, IgmpError, IgmpFrame, IgmpMessage, ALL_ROUTERS,
    ALL_SYSTEMS, IGMPV3_ROUTERS, IPPROTO_IGMP,
};
