//! tandem's L2 virtual switch.
//!
//! Owns the data plane of a host: vhost-user VM ports (QEMU connects to a
//! socket per NIC), AF_PACKET uplinks with an ordered failover list, tap
//! host ports, and the forwarding core between them — MAC learning with
//! limits and aging, flooding, 802.1Q access/trunk policy, token-bucket
//! shaping, MAC-change/promiscuous security, per-port counters — plus the
//! per-frame gate hook where replication's output commit decides whether a
//! frame passes, is held, or is dropped.
//!
//! Pure logic (frame parsing, the MAC table, shaping, the configuration
//! document and its validation, forwarding decisions) lives apart from the
//! I/O (vhost-user, sockets, taps) so it can be tested without QEMU.

pub mod config;
pub mod fdb;
pub mod frame;
#[cfg(any(test, fuzzing, feature = "fault-injection"))]
pub mod fuzzing;
pub mod host;
pub mod hostport;
pub mod netsys;
pub mod offload;
pub mod port;
pub mod shaper;
pub mod switch;
pub mod uplink;
pub mod vhost;
