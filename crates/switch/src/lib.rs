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
//! Pure logic (frame parsing, the MAC table, shaping, offloads, port
//! policy and counters, the configuration document and its validation,
//! forwarding decisions) lives in `tandem-switch-core`, apart from the I/O
//! here (vhost-user, sockets, taps), so it can be tested without QEMU. Its
//! modules are re-exported under the same paths.

pub use tandem_switch_core::{config, dhcp, fdb, frame, igmp, lldp, offload, port, shaper, switch};

pub mod association;
pub mod dhcp_client;
#[cfg(any(test, fuzzing, feature = "fault-injection"))]
pub mod fuzzing;
pub mod host;
pub mod hostport;
pub mod netsys;
pub mod uplink;
pub mod vhost;
