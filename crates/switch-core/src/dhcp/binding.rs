//! The DHCP snooping binding table: one leased address per (VLAN, MAC),
//! the port it was delivered to, and until when.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::wire::{DhcpMessage, MessageType, BOOTREPLY, INFINITE_LEASE};
use crate::frame::Mac;
use crate::port::PortId;

/// How long a client id seen in a client's message waits for the server's
/// ACK. An exchange takes seconds; two minutes covers slow servers and
/// client retries without keeping ids of clients that went away.
pub const PENDING_CLIENT_ID_TTL: Duration = Duration::from_secs(120);
/// RFC 2132 gives option 61 one byte of length. Longer ids (possible with
/// RFC 3396 splitting) are not remembered, so a VM cannot make the switch
/// hold kilobytes per entry.
const MAX_CLIENT_ID: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub vlan: u16,
    pub port: PortId,
    /// `None`: an infinite lease (or one too long for the clock to hold).
    pub expires: Option<Instant>,
    pub client_id: Option<Vec<u8>>,
    pub server: Option<Ipv4Addr>,
}

impl Binding {
    pub fn is_live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }

    pub fn record(&self, now: Instant) -> BindingRecord {
        BindingRecord {
            mac: self.mac,
            ip: self.ip,
            vlan: self.vlan,
            lease_remaining_s: self
                .expires
                .map(|at| at.saturating_duration_since(now).as_secs()),
            client_id: self.client_id.as_deref().map(hex),
            server: self.server,
            port: self.port,
        }
    }
}

/// A binding as it crosses hosts with a migrating VM and as the API shows
/// it: the lease as seconds left (an `Instant` means nothing on another
/// host), the client id as lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingRecord {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub vlan: u16,
    /// `None`: infinite.
    pub lease_remaining_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<Ipv4Addr>,
    #[serde(default)]
    pub port: PortId,
}

impl BindingRecord {
    /// The client id as bytes; `None` without one or when it is not hex.
    pub fn client_id_bytes(&self) -> Option<Vec<u8>> {
        self.client_id.as_deref().and_then(unhex)
    }

    /// Writes a client id the way records carry it (lowercase hex).
    pub fn client_id_text(client_id: &[u8]) -> String {
        hex(client_id)
    }
}

/// What observing a message or installing a record did to the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snooped {
    /// A new binding, or one that changed address or port.
    Installed(Binding),
    /// The same address on the same port, with a new lease.
    Renewed(Binding),
    Removed(Binding),
    Ignored(&'static str),
    TableFull,
}

#[derive(Debug, Clone)]
struct PendingClientId {
    client_id: Vec<u8>,
    port: PortId,
    seen: Instant,
}

/// The bindings, keyed by (VLAN, MAC), with a limit on their number and on
/// the client ids waiting for an ACK.
#[derive(Debug, Clone)]
pub struct BindingTable {
    bindings: HashMap<(u16, Mac), Binding>,
    pending: HashMap<(u16, Mac), PendingClientId>,
    limit: usize,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `None` (infinite) when the lease outlasts what `Instant` can hold: such
/// a lease never ends within the switch's lifetime anyway.
fn expiry(now: Instant, secs: u64) -> Option<Instant> {
    now.checked_add(Duration::from_secs(secs))
}

fn lease_expiry(now: Instant, lease: u32) -> Option<Instant> {
    if lease == INFINITE_LEASE {
        None
    } else {
        expiry(now, u64::from(lease))
    }
}

fn bindable(mac: Mac, ip: Ipv4Addr) -> Result<(), &'static str> {
    if mac.is_zero() || mac.is_group() {
        return Err("no unicast client hardware address");
    }
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err("no unicast address to bind");
    }
    Ok(())
}

impl BindingTable {
    /// `limit` bounds the bindings and, separately, the client ids
    /// remembered while waiting for an ACK.
    pub fn new(limit: usize) -> Self {
        Self {
            bindings: HashMap::new(),
            pending: HashMap::new(),
            limit,
        }
    }

    pub fn len(&self) -> usize {
        self.bindings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    /// A message a VM port sent (the untrusted side). DISCOVER, REQUEST
    /// and INFORM teach the client id the client uses, for its coming ACK;
    /// RELEASE and DECLINE end its binding, but only from the binding's own
    /// port and only for the address the binding holds, so a VM cannot
    /// release another's lease.
    pub fn observe_client(
        &mut self,
        vlan: u16,
        port: PortId,
        msg: &DhcpMessage,
        now: Instant,
    ) -> Snooped {
        if msg.is_server_message() {
            return Snooped::Ignored("a server message from a client's port");
        }
        let mac = msg.chaddr;
        if mac.is_zero() || mac.is_group() {
            return Snooped::Ignored("no unicast client hardware address");
        }
        let key = (vlan, mac);
        let given_up = match msg.message_type {
            Some(MessageType::Discover | MessageType::Request | MessageType::Inform) => {
                return self.remember_client_id(key, port, msg.client_id.as_deref(), now);
            }
            Some(MessageType::Release) => msg.ciaddr,
            Some(MessageType::Decline) => msg.requested_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            _ => return Snooped::Ignored("not a client message snooping acts on"),
        };
        self.pending.remove(&key);
        match self.bindings.get(&key) {
            None => Snooped::Ignored("no binding to give up"),
            Some(b) if b.port != port => Snooped::Ignored("the binding is on another port"),
            Some(b) if !given_up.is_unspecified() && b.ip != given_up => {
                Snooped::Ignored("gives up an address the binding does not hold")
            }
            Some(_) => match self.bindings.remove(&key) {
                Some(b) => Snooped::Removed(b),
                None => Snooped::Ignored("no binding to give up"),
            },
        }
    }

    fn remember_client_id(
        &mut self,
        key: (u16, Mac),
        port: PortId,
        client_id: Option<&[u8]>,
        now: Instant,
    ) -> Snooped {
        let Some(id) = client_id else {
            // The client stopped sending one: an old id must not end up on
            // its next lease.
            self.pending.remove(&key);
            return Snooped::Ignored("client message noted");
        };
        if id.len() > MAX_CLIENT_ID {
            self.pending.remove(&key);
            return Snooped::Ignored("client id too long to remember");
        }
        if !self.pending.contains_key(&key) && self.pending.len() >= self.limit {
            self.pending
                .retain(|_, p| now.saturating_duration_since(p.seen) < PENDING_CLIENT_ID_TTL);
            if self.pending.len() >= self.limit {
                // Still full of live ids: the oldest is the likeliest to be
                // a client that gave up (or a flood), so it makes room.
                let oldest = self
                    .pending
                    .iter()
                    .min_by_key(|(_, p)| p.seen)
                    .map(|(k, _)| *k);
                match oldest {
                    Some(k) => {
                        self.pending.remove(&k);
                    }
                    None => return Snooped::Ignored("no room to remember client ids"),
                }
            }
        }
        self.pending.insert(
            key,
            PendingClientId {
                client_id: id.to_vec(),
                port,
                seen: now,
            },
        );
        Snooped::Ignored("client message noted")
    }

    fn take_client_id(&mut self, key: (u16, Mac), port: PortId, now: Instant) -> Option<Vec<u8>> {
        let p = self.pending.remove(&key)?;
        (p.port == port && now.saturating_duration_since(p.seen) < PENDING_CLIENT_ID_TTL)
            .then_some(p.client_id)
    }

    /// A server's message from a trusted port, on its way to `port`. An
    /// ACK with a lease time installs or renews (an ACK without one answers
    /// an INFORM and leases nothing); a NAK removes; a LEASEACTIVE answer
    /// to a lease query installs what it reports. Anything else is ignored.
    pub fn observe_server(
        &mut self,
        vlan: u16,
        port: PortId,
        msg: &DhcpMessage,
        now: Instant,
    ) -> Snooped {
        if msg.op != BOOTREPLY {
            return Snooped::Ignored("not a BOOTREPLY");
        }
        let mac = msg.chaddr;
        let key = (vlan, mac);
        let ip = match msg.message_type {
            Some(MessageType::Ack) => {
                if msg.yiaddr.is_unspecified() {
                    // An ACK to a RENEWING or REBINDING request may leave
                    // yiaddr empty; ciaddr then holds the address.
                    msg.ciaddr
                } else {
                    msg.yiaddr
                }
            }
            Some(MessageType::LeaseActive) => msg.ciaddr,
            Some(MessageType::Nak) => {
                return match self.bindings.remove(&key) {
                    Some(b) => Snooped::Removed(b),
                    None => Snooped::Ignored("a NAK for a client without a binding"),
                };
            }
            _ => return Snooped::Ignored("not a server reply snooping acts on"),
        };
        let Some(lease) = msg.lease_time else {
            return Snooped::Ignored("no lease time: an answer to an INFORM, or not a lease");
        };
        if let Err(why) = bindable(mac, ip) {
            return Snooped::Ignored(why);
        }
        let remembered = self.take_client_id(key, port, now);
        let echoed = msg.client_id.clone().filter(|id| id.len() <= MAX_CLIENT_ID);
        let client_id = match msg.message_type {
            // The lease query answer reports the id the server holds.
            Some(MessageType::LeaseActive) => echoed.or(remembered),
            _ => remembered.or(echoed),
        };
        self.put(
            Binding {
                mac,
                ip,
                vlan,
                port,
                expires: lease_expiry(now, lease),
                client_id,
                server: msg.server_id,
            },
            now,
        )
    }

    /// Installs a binding handed over from another host with a migrating
    /// VM, onto `port` (the VM's port here, whatever the record says).
    pub fn install(&mut self, rec: &BindingRecord, port: PortId, now: Instant) -> Snooped {
        if let Err(why) = bindable(rec.mac, rec.ip) {
            return Snooped::Ignored(why);
        }
        let client_id = match rec.client_id.as_deref().map(unhex) {
            None => None,
            Some(Some(id)) if id.len() <= MAX_CLIENT_ID => Some(id),
            Some(_) => return Snooped::Ignored("client id is not hex of at most 255 bytes"),
        };
        self.put(
            Binding {
                mac: rec.mac,
                ip: rec.ip,
                vlan: rec.vlan,
                port,
                expires: rec.lease_remaining_s.and_then(|s| expiry(now, s)),
                client_id,
                server: rec.server,
            },
            now,
        )
    }

    fn put(&mut self, binding: Binding, now: Instant) -> Snooped {
        let key = (binding.vlan, binding.mac);
        if !binding.is_live(now) {
            return match self.bindings.remove(&key) {
                Some(old) => Snooped::Removed(old),
                None => Snooped::Ignored("the lease has already ended"),
            };
        }
        if !self.bindings.contains_key(&key) && self.bindings.len() >= self.limit {
            self.age(now);
            if self.bindings.len() >= self.limit {
                return Snooped::TableFull;
            }
        }
        // The server (or the host handing a VM over) is the authority on
        // who holds an address: another MAC's binding for it is stale, and
        // keeping it would let two MACs pass IP source guard as one address.
        self.bindings
            .retain(|k, b| *k == key || b.vlan != binding.vlan || b.ip != binding.ip);
        match self.bindings.insert(key, binding.clone()) {
            Some(old) if old.ip == binding.ip && old.port == binding.port => {
                Snooped::Renewed(binding)
            }
            _ => Snooped::Installed(binding),
        }
    }

    /// The live binding of (vlan, mac).
    pub fn get(&self, vlan: u16, mac: Mac, now: Instant) -> Option<&Binding> {
        self.bindings.get(&(vlan, mac)).filter(|b| b.is_live(now))
    }

    /// IP source guard's question: may `port` send as (`mac`, `ip`) in
    /// `vlan`? Only with a live binding of exactly that on that port.
    pub fn permits(&self, vlan: u16, port: PortId, mac: Mac, ip: Ipv4Addr, now: Instant) -> bool {
        self.get(vlan, mac, now)
            .is_some_and(|b| b.port == port && b.ip == ip)
    }

    /// The live bindings on `port`, as records (what a migrating VM takes
    /// along), ordered by VLAN and MAC.
    pub fn of_port(&self, port: PortId, now: Instant) -> Vec<BindingRecord> {
        self.collect(now, |b| b.port == port)
    }

    /// Forgets everything learned on `port` (it was detached); returns how
    /// many bindings went.
    pub fn remove_port(&mut self, port: PortId) -> usize {
        let before = self.bindings.len();
        self.bindings.retain(|_, b| b.port != port);
        self.pending.retain(|_, p| p.port != port);
        before - self.bindings.len()
    }

    /// Drops expired bindings and stale client ids; returns how many
    /// bindings went.
    pub fn age(&mut self, now: Instant) -> usize {
        let before = self.bindings.len();
        self.bindings.retain(|_, b| b.is_live(now));
        self.pending
            .retain(|_, p| now.saturating_duration_since(p.seen) < PENDING_CLIENT_ID_TTL);
        before - self.bindings.len()
    }

    /// Every live binding, ordered by VLAN and MAC.
    pub fn records(&self, now: Instant) -> Vec<BindingRecord> {
        self.collect(now, |_| true)
    }

    fn collect(&self, now: Instant, keep: impl Fn(&Binding) -> bool) -> Vec<BindingRecord> {
        let mut out: Vec<BindingRecord> = self
            .bindings
            .values()
            .filter(|b| b.is_live(now) && keep(b))
            .map(|b| b.record(now))
            .collect();
        out.sort_by_key(|r| (r.vlan, r.mac));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::{server_reply, BOOTREQUEST};
    use super::*;
    use proptest::prelude::*;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    fn mac(n: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, n])
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    fn ack(m: Mac, addr: Ipv4Addr, lease: Option<u32>) -> DhcpMessage {
        server_reply(1, m, MessageType::Ack, addr, lease, SERVER)
    }

    fn client(m: Mac, t: MessageType, client_id: Option<&[u8]>) -> DhcpMessage {
        DhcpMessage {
            op: BOOTREQUEST,
            xid: 1,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: m,
            message_type: Some(t),
            lease_time: None,
            server_id: None,
            client_id: client_id.map(<[u8]>::to_vec),
            requested_ip: None,
        }
    }

    fn installed(s: Snooped) -> Binding {
        match s {
            Snooped::Installed(b) => b,
            other => panic!("expected Installed, got {other:?}"),
        }
    }

    #[test]
    fn an_ack_installs_with_the_clients_remembered_id() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(8);
        t.observe_client(
            5,
            3,
            &client(mac(1), MessageType::Discover, Some(b"\x01id")),
            t0,
        );
        t.observe_client(
            5,
            3,
            &client(mac(1), MessageType::Request, Some(b"\x01id")),
            t0,
        );
        let b = installed(t.observe_server(5, 3, &ack(mac(1), ip(20), Some(600)), t0));
        assert_eq!((b.mac, b.ip, b.vlan, b.port), (mac(1), ip(20), 5, 3));
        assert_eq!(b.expires, Some(t0 + Duration::from_secs(600)));
        assert_eq!(b.client_id.as_deref(), Some(&b"\x01id"[..]));
        assert_eq!(b.server, Some(SERVER));
        assert_eq!(t.get(5, mac(1), t0), Some(&b));
        assert_eq!(t.get(6, mac(1), t0), None, "bindings are per VLAN");
        assert!(t.get(5, mac(1), t0 + Duration::from_secs(600)).is_none());
    }

    #[test]
    fn a_renewing_ack_with_only_ciaddr_renews() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(8);
        installed(t.observe_server(1, 1, &ack(mac(1), ip(20), Some(60)), t0));
        let renewal = DhcpMessage {
            yiaddr: Ipv4Addr::UNSPECIFIED,
            ciaddr: ip(20),
            ..ack(mac(1), ip(20), Some(120))
        };
        let later = t0 + Duration::from_secs(50);
        match t.observe_server(1, 1, &renewal, later) {
            Snooped::Renewed(b) => assert_eq!(b.expires, Some(later + Duration::from_secs(120))),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn acks_without_a_lease_or_address_and_other_replies_are_ignored() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(8);
        assert!(matches!(
            t.observe_server(1, 1, &ack(mac(1), ip(20), None), t0),
            Snooped::Ignored(_)
        ));
        let nowhere = ack(mac(1), Ipv4Addr::UNSPECIFIED, Some(60));
        assert!(matches!(
            t.observe_server(1, 1, &nowhere, t0),
            Snooped::Ignored(_)
        ));
        let offer = server_reply(1, mac(1), MessageType::Offer, ip(20), Some(60), SERVER);
        assert!(matches!(
            t.observe_server(1, 1, &offer, t0),
            Snooped::Ignored(_)
        ));
        let as_request = DhcpMessage {
            op: BOOTREQUEST,
            ..ack(mac(1), ip(20), Some(60))
        };
        assert!(matches!(
            t.observe_server(1, 1, &as_request, t0),
            Snooped::Ignored(_)
        ));
        let to_group = ack(Mac::BROADCAST, ip(20), Some(60));
        assert!(matches!(
            t.observe_server(1, 1, &to_group, t0),
            Snooped::Ignored(_)
        ));
        // A server's reply coming from a VM's port teaches nothing.
        assert!(matches!(
            t.observe_client(1, 1, &ack(mac(1), ip(20), Some(60)), t0),
            Snooped::Ignored(_)
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn one_binding_per_mac_and_vlan_and_one_mac_per_address() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(8);
        installed(t.observe_server(1, 1, &ack(mac(1), ip(20), Some(60)), t0));
        let moved = installed(t.observe_server(1, 1, &ack(mac(1), ip(21), Some(60)), t0));
        assert_eq!(moved.ip, ip(21));
        assert_eq!(t.len(), 1);
        assert!(!t.permits(1, 1, mac(1), ip(20), t0));
        // The server gave ip 21 to another client: the old holder loses it.
        installed(t.observe_server(1, 2, &ack(mac(2), ip(21), Some(60)), t0));
        assert_eq!(t.len(), 1);
        assert!(t.get(1, mac(1), t0).is_none());
        // The same address in another VLAN is another network.
        installed(t.observe_server(2, 1, &ack(mac(1), ip(21), Some(60)), t0));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_nak_removes() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(8);
        installed(t.observe_server(1, 1, &ack(mac(1), ip(20), Some(60)), t0));
        let nak = server_reply(
            1,
            mac(1),
            MessageType::Nak,
            Ipv4Addr::UNSPECIFIED,
            None,
            SERVER,
        );
        assert!(matches!(t.observe_server(1, 1, &nak, t0), Snooped::Removed(b) if b.ip == ip(20)));
        assert!(matches!(
            t.observe_server(1, 1, &nak, t0),
            Snooped::Ignored(_)
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn a_lease_query_answer_installs_its_remaining_lease() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(8);
        let active = DhcpMessage {
            client_id: Some(vec![1, 2]),
            ..server_reply(
                1,
                mac(1),
                MessageType::LeaseActive,
                ip(30),
                Some(100),
                SERVER,
            )
        };
        let b = installed(t.observe_server(1, 4, &active, t0));
        assert_eq!((b.ip, b.port), (ip(30), 4));
        assert_eq!(b.expires, Some(t0 + Duration::from_secs(100)));
        assert_eq!(b.client_id, Some(vec![1, 2]));
        let unknown = server_reply(
            1,
            mac(2),
            MessageType::LeaseUnknown,
            Ipv4Addr::UNSPECIFIED,
            None,
            SERVER,
        );
        assert!(matches!(
            t.observe_server(1, 4, &unknown, t0),
            Snooped::Ignored(_)
        ));
    }

    #[test]
    fn release_and_decline_remove_only_from_the_owner() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(8);
        installed(t.observe_server(1, 1, &ack(mac(1), ip(20), Some(60)), t0));
        let release = DhcpMessage {
            ciaddr: ip(20),
            ..client(mac(1), MessageType::Release, None)
        };
        assert!(
            matches!(t.observe_client(1, 2, &release, t0), Snooped::Ignored(_)),
            "another port"
        );
        let other_ip = DhcpMessage {
            ciaddr: ip(99),
            ..release.clone()
        };
        assert!(matches!(
            t.observe_client(1, 1, &other_ip, t0),
            Snooped::Ignored(_)
        ));
        assert!(matches!(
            t.observe_client(1, 1, &release, t0),
            Snooped::Removed(_)
        ));
        assert!(t.is_empty());
        installed(t.observe_server(1, 1, &ack(mac(1), ip(20), Some(60)), t0));
        let decline = DhcpMessage {
            requested_ip: Some(ip(20)),
            ..client(mac(1), MessageType::Decline, None)
        };
        assert!(matches!(
            t.observe_client(1, 1, &decline, t0),
            Snooped::Removed(_)
        ));
        assert!(matches!(
            t.observe_client(1, 1, &decline, t0),
            Snooped::Ignored(_)
        ));
    }

    #[test]
    fn remembered_client_ids_are_per_port_aged_and_bounded() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(4);
        t.observe_client(1, 1, &client(mac(1), MessageType::Request, Some(b"a")), t0);
        // The ACK goes to another port: the id is not this client's there.
        let b = installed(t.observe_server(1, 2, &ack(mac(1), ip(20), Some(60)), t0));
        assert_eq!(b.client_id, None);
        t.observe_client(1, 1, &client(mac(2), MessageType::Request, Some(b"b")), t0);
        let late = t0 + PENDING_CLIENT_ID_TTL;
        assert_eq!(
            installed(t.observe_server(1, 1, &ack(mac(2), ip(21), Some(60)), late)).client_id,
            None
        );
        // A client that stops sending an id loses the old one.
        t.observe_client(1, 1, &client(mac(3), MessageType::Discover, Some(b"c")), t0);
        t.observe_client(1, 1, &client(mac(3), MessageType::Request, None), t0);
        assert_eq!(
            installed(t.observe_server(1, 1, &ack(mac(3), ip(22), Some(60)), t0)).client_id,
            None
        );
        // A flood of clients never holds more ids than the limit, and the
        // newest survive.
        for n in 0..50u8 {
            let at = t0 + Duration::from_millis(u64::from(n));
            t.observe_client(2, 1, &client(mac(n), MessageType::Discover, Some(&[n])), at);
            assert!(t.pending.len() <= 4);
        }
        assert!(t.pending.contains_key(&(2, mac(49))));
        assert!(!t.pending.contains_key(&(2, mac(0))));
        let long = vec![7u8; 300];
        t.observe_client(
            3,
            1,
            &client(mac(1), MessageType::Discover, Some(&long)),
            t0,
        );
        assert!(!t.pending.contains_key(&(3, mac(1))));
        t.age(t0 + PENDING_CLIENT_ID_TTL + Duration::from_secs(1));
        assert!(t.pending.is_empty());
    }

    #[test]
    fn a_full_table_refuses_new_clients_but_renews_old_ones() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(2);
        installed(t.observe_server(1, 1, &ack(mac(1), ip(1), Some(60)), t0));
        installed(t.observe_server(1, 1, &ack(mac(2), ip(2), Some(600)), t0));
        assert_eq!(
            t.observe_server(1, 1, &ack(mac(3), ip(3), Some(60)), t0),
            Snooped::TableFull
        );
        assert!(matches!(
            t.observe_server(1, 1, &ack(mac(1), ip(1), Some(60)), t0),
            Snooped::Renewed(_)
        ));
        assert!(matches!(
            t.observe_server(1, 1, &ack(mac(1), ip(9), Some(60)), t0),
            Snooped::Installed(_)
        ));
        let rec = t.records(t0)[0].clone();
        assert!(matches!(
            t.install(&BindingRecord { mac: mac(4), ..rec }, 1, t0),
            Snooped::TableFull
        ));
        // Expired bindings make room.
        let later = t0 + Duration::from_secs(61);
        installed(t.observe_server(1, 1, &ack(mac(3), ip(3), Some(60)), later));
        assert_eq!(t.len(), 2);
        assert_eq!(
            BindingTable::new(0).observe_server(1, 1, &ack(mac(1), ip(1), Some(60)), t0),
            Snooped::TableFull
        );
    }

    #[test]
    fn lease_arithmetic_saturates() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(8);
        let b = installed(t.observe_server(1, 1, &ack(mac(1), ip(1), Some(INFINITE_LEASE)), t0));
        assert_eq!(b.expires, None);
        assert_eq!(t.records(t0)[0].lease_remaining_s, None);
        let almost =
            installed(t.observe_server(1, 1, &ack(mac(2), ip(2), Some(INFINITE_LEASE - 1)), t0));
        assert_eq!(
            almost.expires,
            Some(t0 + Duration::from_secs(u64::from(INFINITE_LEASE - 1)))
        );
        let huge = BindingRecord {
            mac: mac(3),
            ip: ip(3),
            vlan: 1,
            lease_remaining_s: Some(u64::MAX),
            client_id: None,
            server: None,
            port: 0,
        };
        assert_eq!(
            installed(t.install(&huge, 1, t0)).expires,
            None,
            "beyond the clock is forever"
        );
        // A lease that has already ended ends the binding it would renew.
        assert!(matches!(
            t.observe_server(1, 1, &ack(mac(1), ip(1), Some(0)), t0),
            Snooped::Removed(_)
        ));
        assert!(matches!(
            t.observe_server(1, 1, &ack(mac(1), ip(1), Some(0)), t0),
            Snooped::Ignored(_)
        ));
        // Remaining time never goes negative.
        let r = t
            .get(1, mac(2), t0)
            .unwrap()
            .record(t0 + Duration::from_secs(10));
        assert_eq!(
            r.lease_remaining_s,
            Some(u64::from(INFINITE_LEASE - 1) - 10)
        );
    }

    #[test]
    fn source_guard_needs_the_exact_live_binding() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(8);
        installed(t.observe_server(1, 7, &ack(mac(1), ip(20), Some(60)), t0));
        assert!(t.permits(1, 7, mac(1), ip(20), t0));
        assert!(!t.permits(1, 8, mac(1), ip(20), t0), "other port");
        assert!(!t.permits(1, 7, mac(2), ip(20), t0), "other MAC");
        assert!(!t.permits(1, 7, mac(1), ip(21), t0), "other address");
        assert!(!t.permits(2, 7, mac(1), ip(20), t0), "other VLAN");
        assert!(!t.permits(1, 7, mac(1), Ipv4Addr::UNSPECIFIED, t0));
        assert!(
            !t.permits(1, 7, mac(1), ip(20), t0 + Duration::from_secs(60)),
            "expired"
        );
    }

    #[test]
    fn ports_records_removal_and_aging() {
        let t0 = Instant::now();
        let mut t = BindingTable::new(8);
        installed(t.observe_server(1, 1, &ack(mac(2), ip(2), Some(60)), t0));
        installed(t.observe_server(1, 1, &ack(mac(1), ip(1), Some(10)), t0));
        installed(t.observe_server(1, 2, &ack(mac(3), ip(3), Some(60)), t0));
        let on_1: Vec<Mac> = t.of_port(1, t0).iter().map(|r| r.mac).collect();
        assert_eq!(on_1, vec![mac(1), mac(2)]);
        assert_eq!(t.records(t0).len(), 3);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            t.of_port(1, later).len(),
            1,
            "expired bindings are not shown"
        );
        assert_eq!(t.len(), 3, "until aged");
        assert_eq!(t.age(later), 1);
        assert_eq!(t.len(), 2);
        assert_eq!(t.remove_port(1), 1);
        assert_eq!(t.remove_port(1), 0);
        assert_eq!(t.records(later).len(), 1);
    }

    #[test]
    fn records_carry_bindings_to_another_host() {
        let t0 = Instant::now();
        let mut a = BindingTable::new(8);
        a.observe_client(
            3,
            1,
            &client(mac(1), MessageType::Request, Some(&[1, 0xab, 0xcd])),
            t0,
        );
        installed(a.observe_server(3, 1, &ack(mac(1), ip(20), Some(600)), t0));
        let rec = a.of_port(1, t0 + Duration::from_secs(100)).remove(0);
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "mac": "52:54:00:00:00:01", "ip": "10.0.0.20", "vlan": 3,
                "lease_remaining_s": 500, "client_id": "01abcd", "server": "10.0.0.1", "port": 1,
            })
        );
        let minimal: BindingRecord = serde_json::from_str(
            r#"{"mac":"52:54:00:00:00:01","ip":"10.0.0.20","vlan":3,"lease_remaining_s":null}"#,
        )
        .unwrap();
        assert_eq!(
            (minimal.client_id, minimal.server, minimal.port),
            (None, None, 0)
        );
        let back: BindingRecord = serde_json::from_value(json).unwrap();
        let t1 = Instant::now();
        let mut b = BindingTable::new(8);
        let got = installed(b.install(&back, 9, t1));
        assert_eq!(got.port, 9, "the port here, not the one there");
        assert_eq!(got.client_id, Some(vec![1, 0xab, 0xcd]));
        assert_eq!(got.expires, Some(t1 + Duration::from_secs(500)));
        assert!(b.permits(3, 9, mac(1), ip(20), t1));
        assert!(matches!(b.install(&back, 9, t1), Snooped::Renewed(_)));
        assert_eq!(back.client_id_bytes(), Some(vec![1, 0xab, 0xcd]));
        assert_eq!(BindingRecord::client_id_text(&[1, 0xab, 0xcd]), "01abcd");
        for bad in ["0", "zz", "é1"] {
            let r = BindingRecord {
                client_id: Some(bad.into()),
                ..back.clone()
            };
            assert!(matches!(b.install(&r, 9, t1), Snooped::Ignored(_)), "{bad}");
        }
        let ended = BindingRecord {
            lease_remaining_s: Some(0),
            mac: mac(5),
            ..back.clone()
        };
        assert!(matches!(b.install(&ended, 9, t1), Snooped::Ignored(_)));
        let group = BindingRecord {
            mac: Mac::BROADCAST,
            ..back
        };
        assert!(matches!(b.install(&group, 9, t1), Snooped::Ignored(_)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Client(u8, u8, u8, Option<u8>),
        Ack(u8, u8, u8, u32),
        Install(u8, u8, u8, Option<u64>),
        Nak(u8, u8),
        Age(u64),
        RemovePort(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, 0u8..40, 0u8..9, proptest::option::of(any::<u8>()))
                .prop_map(|(v, m, t, id)| Op::Client(v, m, t, id)),
            (0u8..3, 0u8..40, 0u8..40, any::<u32>()).prop_map(|(v, m, a, l)| Op::Ack(
                v,
                m,
                a,
                l % 200
            )),
            (0u8..3, 0u8..40, 0u8..40, proptest::option::of(any::<u64>()))
                .prop_map(|(v, m, a, l)| Op::Install(v, m, a, l)),
            (0u8..3, 0u8..40).prop_map(|(v, m)| Op::Nak(v, m)),
            (0u64..300).prop_map(Op::Age),
            (0u8..4).prop_map(Op::RemovePort),
        ]
    }

    proptest! {
        #[test]
        fn the_table_never_exceeds_its_limit(limit in 0usize..6, ops in proptest::collection::vec(op(), 0..200)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut t = BindingTable::new(limit);
            for o in ops {
                let port = |m: u8| PortId::from(m % 4);
                match o {
                    Op::Client(v, m, ty, id) => {
                        let msg = DhcpMessage { ciaddr: ip(m), ..client(mac(m), MessageType::from_code(ty), id.as_ref().map(std::slice::from_ref)) };
                        t.observe_client(u16::from(v), port(m), &msg, now);
                    }
                    Op::Ack(v, m, a, l) => { t.observe_server(u16::from(v), port(m), &ack(mac(m), ip(a.max(1)), Some(l)), now); }
                    Op::Install(v, m, a, l) => {
                        let rec = BindingRecord { mac: mac(m), ip: ip(a), vlan: u16::from(v), lease_remaining_s: l, client_id: None, server: None, port: 0 };
                        t.install(&rec, port(m), now);
                    }
                    Op::Nak(v, m) => { t.observe_server(u16::from(v), 0, &server_reply(1, mac(m), MessageType::Nak, ip(0), None, SERVER), now); }
                    Op::Age(s) => { now += Duration::from_secs(s); t.age(now); }
                    Op::RemovePort(p) => { t.remove_port(PortId::from(p)); }
                }
                prop_assert!(t.len() <= limit);
                prop_assert!(t.pending.len() <= limit);
                let mut ips: Vec<(u16, Ipv4Addr)> = t.bindings.values().map(|b| (b.vlan, b.ip)).collect();
                let n = ips.len();
                ips.sort();
                ips.dedup();
                prop_assert_eq!(ips.len(), n, "one MAC per address");
            }
        }
    }
}
