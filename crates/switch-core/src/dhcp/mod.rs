//! DHCP snooping's pure half: what the switch reads from and writes into
//! DHCP traffic, and the binding table it keeps from it.
//!
//! This module owns:
//!
//! - the BOOTP/DHCP message format (RFC 2131, options from RFC 2132, the
//!   lease query of RFC 4388): [`parse_bootp`], [`encode`] and the encoders
//!   for the few messages tandem sends itself ([`encode_lease_query`],
//!   [`encode_renew_request`]) or that tests need;
//! - finding DHCP in an Ethernet frame ([`is_dhcp`], [`parse_frame`]) and
//!   the IPv4 source a frame claims, for IP source guard ([`ipv4_claim`]);
//! - the binding table ([`BindingTable`]): which (VLAN, MAC) holds which
//!   leased address on which port, until when, learned from the server
//!   replies seen on trusted ports, from lease queries, or handed over with
//!   a migrating VM ([`BindingRecord`]).
//!
//! Nothing here does I/O or reads the clock: time is passed in. Every
//! function takes untrusted bytes and never panics on them.

mod binding;
mod packet;
mod wire;

pub use binding::{Binding, BindingRecord, BindingTable, Snooped, PENDING_CLIENT_ID_TTL};
pub use packet::{ipv4_claim, is_dhcp, parse_frame, udp_frame, DhcpFrame, Ipv4Claim};
pub use wire::{
    encode, encode_discover, encode_lease_query, encode_renew_request, encode_select_request,
    encode_server_reply, parse_bootp, server_reply, DhcpError, DhcpMessage, MessageType, BOOTREPLY,
    BOOTREQUEST, BROADCAST_FLAG, CLIENT_PORT, INFINITE_LEASE, MAGIC_COOKIE, SERVER_PORT,
};
