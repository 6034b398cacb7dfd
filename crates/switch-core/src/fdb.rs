//! The MAC table: which port a (VLAN, MAC) was last seen on, with a total
//! limit, a per-port learning limit, and aging. Time is passed in, so the
//! table is pure and testable.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::frame::Mac;
use crate::port::PortId;

/// What learning a source address did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    New,
    Refreshed,
    /// The address moved from another port (a VM migrated, failed over, or
    /// a cable moved).
    Moved {
        from: PortId,
    },
    /// Not learned: the table is full.
    TableFull,
    /// Not learned: the port reached its learning limit.
    PortLimit,
    /// Not moved: the address is pinned to `pinned_to` (a VM's port),
    /// and was seen on another port.
    PinnedElsewhere {
        pinned_to: PortId,
    },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    port: PortId,
    seen: Instant,
    /// Pinned entries (a VM port's own MAC) never age out.
    pinned: bool,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FdbEntry {
    pub vlan: u16,
    pub mac: String,
    pub port: PortId,
    pub age_s: u64,
    pub pinned: bool,
}

#[derive(Debug)]
pub struct Fdb {
    entries: HashMap<(u16, Mac), Entry>,
    per_port: HashMap<PortId, usize>,
    limit: usize,
    aging: Duration,
}

impl Fdb {
    pub fn new(limit: usize, aging: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            per_port: HashMap::new(),
            limit,
            aging,
        }
    }

    pub fn set_limits(&mut self, limit: usize, aging: Duration) {
        self.limit = limit;
        self.aging = aging;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn count(&mut self, port: PortId, delta: isize) {
        let c = self.per_port.entry(port).or_insert(0);
        *c = c.saturating_add_signed(delta);
        if *c == 0 {
            self.per_port.remove(&port);
        }
    }

    /// Records that `mac` on `vlan` was seen on `port`. `port_limit` is the
    /// port group's learning limit (0 = only the table's own limit).
    pub fn learn(
        &mut self,
        vlan: u16,
        mac: Mac,
        port: PortId,
        port_limit: usize,
        now: Instant,
    ) -> Learned {
        if mac.is_group() || mac.is_zero() {
            return Learned::Refreshed; // never learned, never an error
        }
        let key = (vlan, mac);
        if let Some(e) = self.entries.get_mut(&key) {
            if e.port == port {
                e.seen = now;
                return Learned::Refreshed;
            }
            if e.pinned {
                // A pinned address seen elsewhere: only its own port's
                // announcement (pin) moves it, however long the VM has
                // been silent (the pin lasts while its port is attached;
                // `flush_port` ends it). Moving it here would let any
                // spoofer steal a quiet VM's traffic (audit L7).
                return Learned::PinnedElsewhere { pinned_to: e.port };
            }
            let from = e.port;
            if port_limit > 0 && self.per_port.get(&port).copied().unwrap_or(0) >= port_limit {
                return Learned::PortLimit;
            }
            *e = Entry {
                port,
                seen: now,
                pinned: false,
            };
            self.count(from, -1);
            self.count(port, 1);
            return Learned::Moved { from };
        }
        if self.entries.len() >= self.limit {
            // Make room from expired entries before refusing.
            self.age(now);
            if self.entries.len() >= self.limit {
                return Learned::TableFull;
            }
        }
        if port_limit > 0 && self.per_port.get(&port).copied().unwrap_or(0) >= port_limit {
            return Learned::PortLimit;
        }
        self.entries.insert(
            key,
            Entry {
                port,
                seen: now,
                pinned: false,
            },
        );
        self.count(port, 1);
        Learned::New
    }

    /// Binds `mac` to `port` at once, displacing any other binding: a VM
    /// announced itself on this port (it started, migrated or failed over).
    pub fn pin(&mut self, vlan: u16, mac: Mac, port: PortId, now: Instant) -> Option<PortId> {
        let old = self.entries.insert(
            (vlan, mac),
            Entry {
                port,
                seen: now,
                pinned: true,
            },
        );
        if let Some(o) = old {
            self.count(o.port, -1);
        }
        self.count(port, 1);
        old.map(|o| o.port).filter(|&p| p != port)
    }

    /// Where frames to `mac` on `vlan` go; `None` means flood.
    pub fn lookup(&self, vlan: u16, mac: Mac, now: Instant) -> Option<PortId> {
        let e = self.entries.get(&(vlan, mac))?;
        if !e.pinned && now.duration_since(e.seen) >= self.aging {
            return None;
        }
        Some(e.port)
    }

    /// Drops entries not seen for the aging time; returns how many.
    pub fn age(&mut self, now: Instant) -> usize {
        let aging = self.aging;
        let mut gone = Vec::new();
        self.entries.retain(|_, e| {
            let keep = e.pinned || now.duration_since(e.seen) < aging;
            if !keep {
                gone.push(e.port);
            }
            keep
        });
        for p in &gone {
            self.count(*p, -1);
        }
        gone.len()
    }

    /// Forgets everything learned on `port` (it went down or was removed).
    pub fn flush_port(&mut self, port: PortId) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.port != port);
        self.per_port.remove(&port);
        before - self.entries.len()
    }

    pub fn entries(&self, now: Instant) -> Vec<FdbEntry> {
        let mut v: Vec<FdbEntry> = self
            .entries
            .iter()
            .map(|(&(vlan, mac), e)| FdbEntry {
                vlan,
                mac: mac.to_string(),
                port: e.port,
                age_s: now.duration_since(e.seen).as_secs(),
                pinned: e.pinned,
            })
            .collect();
        v.sort_by(|a, b| (a.vlan, &a.mac).cmp(&(b.vlan, &b.mac)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn learns_moves_and_ages() {
        let t0 = Instant::now();
        let mut f = Fdb::new(10, Duration::from_secs(300));
        assert_eq!(f.learn(1, mac(1), 7, 0, t0), Learned::New);
        assert_eq!(f.lookup(1, mac(1), t0), Some(7));
        assert_eq!(f.lookup(2, mac(1), t0), None, "VLANs are separate tables");
        assert_eq!(f.learn(1, mac(1), 8, 0, t0), Learned::Moved { from: 7 });
        assert_eq!(f.lookup(1, mac(1), t0), Some(8));
        let later = t0 + Duration::from_secs(301);
        assert_eq!(f.lookup(1, mac(1), later), None, "aged out for lookups");
        assert_eq!(f.age(later), 1);
        assert!(f.is_empty());
    }

    #[test]
    fn group_addresses_are_never_learned() {
        let t0 = Instant::now();
        let mut f = Fdb::new(10, Duration::from_secs(300));
        f.learn(1, Mac::BROADCAST, 1, 0, t0);
        f.learn(1, Mac([1, 0, 0x5e, 0, 0, 1]), 1, 0, t0);
        assert!(f.is_empty());
    }

    #[test]
    fn limits_hold_and_expired_entries_make_room() {
        let t0 = Instant::now();
        let mut f = Fdb::new(2, Duration::from_secs(10));
        assert_eq!(f.learn(1, mac(1), 1, 0, t0), Learned::New);
        assert_eq!(f.learn(1, mac(2), 1, 0, t0), Learned::New);
        assert_eq!(f.learn(1, mac(3), 2, 0, t0), Learned::TableFull);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(f.learn(1, mac(3), 2, 0, later), Learned::New);
        let mut g = Fdb::new(100, Duration::from_secs(10));
        assert_eq!(g.learn(1, mac(1), 1, 1, t0), Learned::New);
        assert_eq!(g.learn(1, mac(2), 1, 1, t0), Learned::PortLimit);
        assert_eq!(
            g.learn(1, mac(2), 2, 1, t0),
            Learned::New,
            "limit is per port"
        );
    }

    #[test]
    fn pinned_macs_resist_spoofing_and_follow_announcements() {
        let t0 = Instant::now();
        let mut f = Fdb::new(10, Duration::from_secs(300));
        f.learn(1, mac(9), 3, 0, t0);
        assert_eq!(f.pin(1, mac(9), 5, t0), Some(3), "announcement moves it");
        f.learn(1, mac(9), 6, 0, t0);
        assert_eq!(
            f.lookup(1, mac(9), t0),
            Some(5),
            "a spoofed source does not"
        );
        assert_eq!(
            f.age(t0 + Duration::from_secs(1000)),
            0,
            "pinned never ages"
        );
        assert_eq!(f.flush_port(5), 1);
    }

    /// Audit L7: a VM silent for longer than the aging time keeps its
    /// address; a spoofer elsewhere learns nothing, and only the VM's own
    /// announcement from another port moves it.
    #[test]
    fn a_silent_pinned_vm_keeps_its_address_past_the_aging_time() {
        let t0 = Instant::now();
        let aging = Duration::from_secs(300);
        let mut f = Fdb::new(10, aging);
        f.pin(1, mac(9), 5, t0);
        let later = t0 + aging * 10;
        assert_eq!(
            f.learn(1, mac(9), 6, 0, later),
            Learned::PinnedElsewhere { pinned_to: 5 }
        );
        assert_eq!(f.lookup(1, mac(9), later), Some(5));
        assert_eq!(f.pin(1, mac(9), 7, later), Some(5));
        assert_eq!(f.lookup(1, mac(9), later), Some(7));
    }

    proptest! {
        /// The per-port counts always agree with the entries, so limits
        /// cannot drift whatever the sequence of operations.
        #[test]
        fn per_port_counts_match(ops in proptest::collection::vec((0u8..4, 0u8..6, 0u32..3, 0u64..40), 0..200)) {
            let t0 = Instant::now();
            let mut f = Fdb::new(5, Duration::from_secs(10));
            for (op, m, p, t) in ops {
                let now = t0 + Duration::from_secs(t);
                match op {
                    0 | 1 => { f.learn(1, mac(m), p, 3, now); }
                    2 => { f.pin(1, mac(m), p, now); }
                    _ => { f.age(now); }
                }
                for port in 0..3u32 {
                    let real = f.entries.values().filter(|e| e.port == port).count();
                    prop_assert_eq!(f.per_port.get(&port).copied().unwrap_or(0), real);
                }
            }
        }
    }
}
