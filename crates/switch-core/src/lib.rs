//! The pure forwarding logic of tandem's L2 switch.
//!
//! This crate owns what the switch decides, with no I/O of its own:
//!
//! - [`frame`]: Ethernet and 802.1Q parsing, tag push/pop, the [`frame::Mac`]
//!   type every layer of tandem passes MAC addresses as;
//! - [`lldp`]: reading (and writing) LLDPDUs, and an uplink's table of
//!   the neighbours heard on its members;
//! - [`fdb`]: the MAC table (learning, limits, aging, pinning);
//! - [`shaper`]: token-bucket shaping;
//! - [`offload`]: virtio-net checksum/TSO metadata and finishing it in
//!   software;
//! - [`port`]: the contract with a port's I/O thread — port ids, drop
//!   reasons and counters, the bounded [`port::EgressQueue`], the
//!   [`port::Ingress`] trait;
//! - [`config`]: the switch document (port groups, uplinks, host ports) and
//!   its validation;
//! - [`switch`]: the forwarding core — per-port VLAN/security/shaping
//!   policy, learning, flooding, and the per-frame gate hook, whose verdict
//!   is output commit's [`tandem_outcommit::GateDecision`].
//!
//! Everything here is tested without QEMU, sockets or privileges. The one
//! kernel object it touches is the eventfd in each egress queue, which
//! wakes the port's I/O thread. `tandem-switch` adds the I/O (vhost-user VM
//! ports, AF_PACKET uplinks, tap host ports, the host's switch service) and
//! re-exports these modules under the same paths.

pub mod config;
pub mod dhcp;
pub mod fdb;
pub mod frame;
pub mod igmp;
pub mod lldp;
pub mod offload;
pub mod port;
pub mod shaper;
pub mod switch;
