//! Snooping in the forwarding core, end to end through `Switch`: DHCP
//! server filtering and bindings, IP source guard, IGMP confinement, the
//! association of migrated VMs and the switchover queue. Frames go in
//! through `Ingress` and are read back from the ports' egress queues.

use std::net::Ipv4Addr;

use super::*;
use crate::config::{SwitchSettings, UnknownLease, VlanMode};
use crate::dhcp::{self, BindingRecord, MessageType};
use crate::igmp::{self, IgmpMessage};
use crate::port::{DropSnapshot, Ingress};

const VLAN: u16 = 10;
/// The smallest queue a document allows, so bounds are cheap to reach.
const QUEUE: usize = 16;
const LEASE_S: u32 = 3600;

const SERVER_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0x67]);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const OTHER_SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const REMOTE_MAC: Mac = Mac([0x02, 0, 0, 0, 0, 0x99]);
const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const LEASED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
const SPOOFED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 51);
const GROUP: Ipv4Addr = Ipv4Addr::new(239, 1, 2, 3);
const MDNS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);

fn mac(n: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0, n])
}

fn access(name: &str) -> PortGroup {
    let mut g = PortGroup::named(name);
    g.vlan = Some(VLAN);
    g
}

fn dhcp_snooping(name: &str) -> PortGroup {
    let mut g = access(name);
    g.dhcp_snooping = true;
    g.dhcp_servers = vec![SERVER_IP, OTHER_SERVER_IP];
    g
}

fn source_guard(name: &str, unknown_lease: UnknownLease) -> PortGroup {
    let mut g = dhcp_snooping(name);
    g.ip_source_guard = true;
    g.unknown_lease = unknown_lease;
    g
}

fn igmp_snooping(name: &str) -> PortGroup {
    let mut g = access(name);
    g.igmp_snooping = true;
    g
}

/// What a migrated VM's group usually has: every kind of snooping.
fn all_snooping(name: &str) -> PortGroup {
    let mut g = source_guard(name, UnknownLease::Open);
    g.igmp_snooping = true;
    g
}

type PortHandles = (PortId, Arc<EgressQueue>, Arc<PortCounters>);

/// A switch with VM ports in the given groups and one uplink `up`, a trunk
/// carrying `VLAN` tagged.
struct Rig {
    sw: Arc<Switch>,
    ports: HashMap<&'static str, PortHandles>,
}

impl Rig {
    /// Every port up, with the announcements `port_up` flooded discarded.
    fn new(groups: Vec<PortGroup>, vms: &[(&'static str, u8, &str)]) -> Self {
        let r = Self::down(groups, vms);
        for (id, _, _) in r.ports.values() {
            r.sw.port_up(*id);
        }
        r.drain_all();
        r
    }

    /// Only the uplink up: VM ports wait for their association.
    fn down(mut groups: Vec<PortGroup>, vms: &[(&'static str, u8, &str)]) -> Self {
        let mut trunk = PortGroup::named("trunk");
        trunk.vlan_mode = VlanMode::Trunk;
        trunk.allowed_vlans = vec![VLAN];
        groups.push(trunk);
        let doc = SwitchDocument {
            switch: SwitchSettings {
                port_queue_frames: QUEUE,
                ..Default::default()
            },
            port_groups: groups,
            ..Default::default()
        };
        let sw = Switch::new(doc).unwrap();
        let up = sw.add_port("up", PortKind::Uplink, "trunk").unwrap();
        sw.port_up(up.0);
        let mut r = Rig {
            sw,
            ports: HashMap::from([("up", up)]),
        };
        for &(name, n, group) in vms {
            r.add_vm(name, n, group);
        }
        r
    }

    fn add_vm(&mut self, name: &'static str, n: u8, group: &str) -> PortId {
        let kind = PortKind::Vm {
            vm: name.into(),
            nic: 0,
            mac: mac(n),
        };
        let handles = self.sw.add_port(name, kind, group).unwrap();
        let id = handles.0;
        self.ports.insert(name, handles);
        id
    }

    fn id(&self, port: &str) -> PortId {
        self.ports[port].0
    }

    fn send(&self, port: &str, f: &[u8]) {
        self.sw.ingress(self.id(port), f);
    }

    /// What the network beyond the uplink sends: tagged, as the trunk wants.
    fn send_up(&self, f: &[u8]) {
        self.send("up", &frame::push_tag(f, VLAN));
    }

    fn take(&self, port: &str) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.ports[port].1.pop().map(|p| p.frame)).collect()
    }

    /// What left the uplink, untagged (each frame must carry `VLAN`).
    fn take_up(&self) -> Vec<Vec<u8>> {
        self.take("up")
            .into_iter()
            .map(|f| {
                assert_eq!(
                    frame::parse(&f).unwrap().vid,
                    Some(VLAN),
                    "untagged on the trunk"
                );
                frame::pop_tag(&f)
            })
            .collect()
    }

    fn drain_all(&self) {
        for (_, q, _) in self.ports.values() {
            q.clear();
        }
    }

    fn drops(&self, port: &str) -> DropSnapshot {
        self.ports[port].2.snapshot().drops
    }

    fn stats(&self) -> SnoopingStats {
        self.sw.snooping_stats()
    }
}

fn client_id(client: Mac) -> Vec<u8> {
    let mut id = vec![1];
    id.extend_from_slice(&client.0);
    id
}

fn server_frame(src: Mac, dst: Mac, msg: &dhcp::DhcpMessage) -> Vec<u8> {
    dhcp::udp_frame(
        src,
        dst,
        SERVER_IP,
        Ipv4Addr::BROADCAST,
        dhcp::SERVER_PORT,
        dhcp::CLIENT_PORT,
        &dhcp::encode(msg),
    )
}

fn server_reply(t: MessageType, client: Mac, ip: Ipv4Addr) -> dhcp::DhcpMessage {
    dhcp::server_reply(7, client, t, ip, Some(LEASE_S), SERVER_IP)
}

/// A server's message of type `t` for `client`, sent from `src` to `dst`.
fn server_msg(src: Mac, dst: Mac, t: MessageType, client: Mac, ip: Ipv4Addr) -> Vec<u8> {
    server_frame(src, dst, &server_reply(t, client, ip))
}

fn client_frame(
    client: Mac,
    src_ip: Ipv4Addr,
    dst: Mac,
    dst_ip: Ipv4Addr,
    bootp: &[u8],
) -> Vec<u8> {
    dhcp::udp_frame(
        client,
        dst,
        src_ip,
        dst_ip,
        dhcp::CLIENT_PORT,
        dhcp::SERVER_PORT,
        bootp,
    )
}

fn discover(client: Mac) -> Vec<u8> {
    let bootp = dhcp::encode_discover(7, client, Some(&client_id(client)));
    client_frame(
        client,
        Ipv4Addr::UNSPECIFIED,
        Mac::BROADCAST,
        Ipv4Addr::BROADCAST,
        &bootp,
    )
}

fn select_request(client: Mac, ip: Ipv4Addr) -> Vec<u8> {
    let bootp = dhcp::encode_select_request(7, client, ip, SERVER_IP, Some(&client_id(client)));
    client_frame(
        client,
        Ipv4Addr::UNSPECIFIED,
        Mac::BROADCAST,
        Ipv4Addr::BROADCAST,
        &bootp,
    )
}

/// A DHCPRELEASE of `ip` naming `client`, sent by `sender` from `ip`.
fn release(sender: Mac, client: Mac, ip: Ipv4Addr) -> Vec<u8> {
    // A release carries what a renewing request does (ciaddr, chaddr),
    // only its type differs.
    let mut msg = dhcp::parse_bootp(&dhcp::encode_renew_request(8, client, ip, None)).unwrap();
    msg.message_type = Some(MessageType::Release);
    client_frame(sender, ip, SERVER_MAC, SERVER_IP, &dhcp::encode(&msg))
}

/// Ordinary unicast IPv4 (UDP, not DHCP) from `src` claiming `ip`, to a
/// host beyond the uplink.
fn ipv4_from(src: Mac, ip: Ipv4Addr) -> Vec<u8> {
    dhcp::udp_frame(src, REMOTE_MAC, ip, REMOTE_IP, 4000, 4000, b"payload")
}

/// A gratuitous ARP reply from `src` claiming `ip`, with hardware type
/// `htype` (1: Ethernet).
fn arp_from(src: Mac, ip: Ipv4Addr, htype: u16) -> Vec<u8> {
    let mut f = Mac::BROADCAST.0.to_vec();
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&frame::ETHERTYPE_ARP.to_be_bytes());
    f.extend_from_slice(&htype.to_be_bytes());
    f.extend_from_slice(&frame::ETHERTYPE_IPV4.to_be_bytes());
    f.extend_from_slice(&[6, 4, 0, 2]);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&Mac::BROADCAST.0);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0);
    f
}

/// IPv4 multicast data (UDP) to `group`, carrying `marker` so copies can
/// be told apart.
fn multicast(src: Mac, group: Ipv4Addr, marker: u8) -> Vec<u8> {
    dhcp::udp_frame(
        src,
        igmp::group_mac(group),
        REMOTE_IP,
        group,
        5000,
        5000,
        &[marker],
    )
}

/// Unicast to `dst` numbered `n`, so the order of delivery can be checked.
fn numbered(dst: Mac, src: Mac, n: u8) -> Vec<u8> {
    dhcp::udp_frame(src, dst, REMOTE_IP, LEASED, 4000, 4000, &[n; 8])
}

fn is_igmp_query(f: &[u8]) -> bool {
    igmp::parse_frame(f).is_some_and(|i| matches!(i.msg, IgmpMessage::Query { .. }))
}

fn lease_of(rec: &BindingRecord) -> u64 {
    rec.lease_remaining_s.expect("a finite lease")
}

/// What vm5's source hands over: its binding and its group.
fn vm5_handover() -> NicNetState {
    NicNetState {
        mac: mac(5),
        bindings: vec![handed_over_binding()],
        groups: vec![GROUP],
    }
}

fn handed_over_binding() -> BindingRecord {
    BindingRecord {
        mac: mac(5),
        ip: LEASED,
        // The source's VLAN and port mean nothing here.
        vlan: 99,
        lease_remaining_s: Some(1800),
        client_id: Some(BindingRecord::client_id_text(&client_id(mac(5)))),
        server: Some(SERVER_IP),
        port: 77,
    }
}

fn migrated(handover: Option<NicNetState>) -> Association {
    Association {
        migrated: true,
        handover,
    }
}

// --- DHCP snooping: who may answer as a server ------------------------

#[test]
fn server_messages_from_an_untrusted_vm_are_dropped_and_counted() {
    let r = Rig::new(
        vec![dhcp_snooping("snoop"), access("plain")],
        &[
            ("vm1", 1, "snoop"),
            ("vm2", 2, "snoop"),
            ("vm3", 3, "plain"),
        ],
    );
    for t in [MessageType::Offer, MessageType::Ack, MessageType::Nak] {
        r.send(
            "vm1",
            &server_msg(mac(1), Mac::BROADCAST, t, mac(2), LEASED),
        );
    }
    // A rogue reply dressed as a request is still a reply.
    let mut dressed = server_reply(MessageType::Ack, mac(2), LEASED);
    dressed.op = dhcp::BOOTREQUEST;
    r.send("vm1", &server_frame(mac(1), mac(2), &dressed));

    for p in ["vm2", "vm3", "up"] {
        assert!(r.take(p).is_empty(), "{p} got a rogue server's message");
    }
    assert_eq!(r.drops("vm1").dhcp_server, 4);
    assert_eq!(r.drops("vm1").total(), 4, "nothing else counted");
    let s = r.stats();
    assert_eq!(s.counters.dhcp_server_dropped, 4);
    assert!(s.bindings.is_empty(), "a dropped ACK taught a binding");
    assert_eq!(s.counters.bindings_learned, 0);
}

#[test]
fn server_messages_pass_from_the_uplink_a_trusted_vm_or_a_group_without_snooping() {
    let mut trusted = dhcp_snooping("trusted");
    trusted.dhcp_trusted = true;
    let r = Rig::new(
        vec![dhcp_snooping("snoop"), trusted, access("plain")],
        &[
            ("vm1", 1, "snoop"),
            ("vm2", 2, "snoop"),
            ("srv", 3, "trusted"),
            ("lab", 4, "plain"),
        ],
    );
    let offer = server_msg(
        SERVER_MAC,
        Mac::BROADCAST,
        MessageType::Offer,
        mac(1),
        LEASED,
    );
    r.send_up(&offer);
    for p in ["vm1", "vm2", "srv", "lab"] {
        assert_eq!(r.take(p), vec![offer.clone()], "{p}: offer from the uplink");
    }

    let offer = server_msg(mac(3), Mac::BROADCAST, MessageType::Offer, mac(1), LEASED);
    r.send("srv", &offer);
    for p in ["vm1", "vm2", "lab"] {
        assert_eq!(
            r.take(p),
            vec![offer.clone()],
            "{p}: offer from the trusted VM"
        );
    }
    assert_eq!(r.take_up(), vec![offer]);

    // Filtering is the snooping group's: a VM in a group without it may
    // run a server.
    let offer = server_msg(mac(4), Mac::BROADCAST, MessageType::Offer, mac(1), LEASED);
    r.send("lab", &offer);
    assert_eq!(r.take("vm1"), vec![offer.clone()]);
    assert_eq!(r.take_up(), vec![offer]);
    r.drain_all();

    // The trusted VM's ACK is a server's word: it binds the client.
    let ack = server_msg(mac(3), mac(1), MessageType::Ack, mac(1), LEASED);
    r.send("srv", &ack);
    assert_eq!(r.take("vm1"), vec![ack]);
    assert!(r.take("vm2").is_empty() && r.take_up().is_empty());

    for p in ["vm1", "vm2", "srv", "lab", "up"] {
        assert_eq!(r.drops(p), DropSnapshot::default(), "{p} dropped something");
    }
    let s = r.stats();
    assert_eq!(s.counters.dhcp_server_dropped, 0);
    let bound: Vec<_> = s.bindings.iter().map(|b| (b.mac, b.ip, b.port)).collect();
    assert_eq!(bound, vec![(mac(1), LEASED, r.id("vm1"))]);
}

// --- DHCP snooping: bindings ---------------------------------------------

#[test]
fn an_ack_from_the_uplink_binds_the_client_and_its_release_unbinds_it() {
    let r = Rig::new(
        vec![dhcp_snooping("snoop")],
        &[("vm1", 1, "snoop"), ("vm2", 2, "snoop")],
    );
    let d = discover(mac(1));
    r.send("vm1", &d);
    assert_eq!(r.take_up(), vec![d], "a client's DISCOVER goes out");
    r.send_up(&server_msg(
        SERVER_MAC,
        Mac::BROADCAST,
        MessageType::Offer,
        mac(1),
        LEASED,
    ));
    assert_eq!(r.take("vm1").len(), 1);
    assert!(r.stats().bindings.is_empty(), "an OFFER binds nothing");
    r.send("vm1", &select_request(mac(1), LEASED));
    assert_eq!(r.take_up().len(), 1);
    r.drain_all();

    let ack = server_msg(SERVER_MAC, mac(1), MessageType::Ack, mac(1), LEASED);
    r.send_up(&ack);
    assert_eq!(r.take("vm1"), vec![ack], "the ACK reaches its client");
    assert!(r.take("vm2").is_empty());

    let s = r.stats();
    assert_eq!(s.counters.bindings_learned, 1);
    assert_eq!(s.bindings.len(), 1);
    let b = &s.bindings[0];
    assert_eq!(
        (b.mac, b.ip, b.vlan, b.port, b.server),
        (mac(1), LEASED, VLAN, r.id("vm1"), Some(SERVER_IP))
    );
    let lease = u64::from(LEASE_S);
    assert!((lease - 1..=lease).contains(&lease_of(b)), "{b:?}");
    assert_eq!(
        b.client_id_bytes(),
        Some(client_id(mac(1))),
        "the client id of its DISCOVER/REQUEST"
    );

    // Another VM cannot release vm1's lease.
    r.send("vm2", &release(mac(2), mac(1), LEASED));
    assert_eq!(r.stats().bindings.len(), 1, "released from another port");
    r.drain_all();

    let rel = release(mac(1), mac(1), LEASED);
    r.send("vm1", &rel);
    assert_eq!(
        r.take_up(),
        vec![rel],
        "the RELEASE still reaches the server"
    );
    let s = r.stats();
    assert!(s.bindings.is_empty(), "{:?}", s.bindings);
    assert_eq!(s.counters.bindings_removed, 1);
}

// --- IP source guard -------------------------------------------------------

#[test]
fn source_guard_passes_only_the_bound_address_and_never_blocks_dhcp() {
    let r = Rig::new(
        vec![source_guard("guard", UnknownLease::Open)],
        &[("vm1", 1, "guard"), ("vm2", 2, "guard")],
    );
    let guarded = |n: u64| {
        assert_eq!(r.drops("vm1").source_guard, n);
        assert_eq!(r.stats().counters.source_guard_dropped, n);
    };

    r.send("vm1", &ipv4_from(mac(1), LEASED));
    r.send("vm1", &arp_from(mac(1), LEASED, 1));
    assert!(r.take_up().is_empty() && r.take("vm2").is_empty());
    guarded(2);

    // The VM's own DHCP, from 0.0.0.0, is how it gets a binding.
    let d = discover(mac(1));
    r.send("vm1", &d);
    assert_eq!(r.take_up(), vec![d]);
    r.send("vm1", &select_request(mac(1), LEASED));
    assert_eq!(r.take_up().len(), 1);
    guarded(2);

    r.send_up(&server_msg(
        SERVER_MAC,
        mac(1),
        MessageType::Ack,
        mac(1),
        LEASED,
    ));
    r.drain_all();

    let ok = ipv4_from(mac(1), LEASED);
    r.send("vm1", &ok);
    assert_eq!(r.take_up(), vec![ok], "the bound address passes");
    let arp = arp_from(mac(1), LEASED, 1);
    r.send("vm1", &arp);
    assert_eq!(
        r.take("vm2"),
        vec![arp],
        "an ARP claim of the bound address passes"
    );
    r.drain_all();
    guarded(2);

    r.send("vm1", &ipv4_from(mac(1), SPOOFED));
    r.send("vm1", &arp_from(mac(1), SPOOFED, 1));
    assert!(r.take_up().is_empty() && r.take("vm2").is_empty());
    guarded(4);

    // The binding is vm1's: vm2 may not use the address either.
    r.send("vm2", &ipv4_from(mac(2), LEASED));
    assert!(r.take_up().is_empty());
    assert_eq!(r.drops("vm2").source_guard, 1);
}

#[test]

fn source_guard_holds_udp_on_dhcp_ports_that_is_not_dhcp() {
    let r = Rig::new(
        vec![source_guard("guard", UnknownLease::Block)],
        &[("vm1", 1, "guard")],
    );
    // From a spoofed address and the DHCP client port to any host: not a
    // BOOTP message, so nothing DHCP snooping could vouch for.
    let spoofed = dhcp::udp_frame(
        mac(1),
        REMOTE_MAC,
        SPOOFED,
        REMOTE_IP,
        dhcp::CLIENT_PORT,
        53,
        b"not bootp at all",
    );
    r.send("vm1", &spoofed);
    assert!(r.take_up().is_empty(), "spoofed UDP left through the guard");
    assert_eq!(r.drops("vm1").total(), 1);
}

#[test]

fn source_guard_holds_arp_claims_of_any_hardware_type_hosts_accept() {
    let r = Rig::new(
        vec![source_guard("guard", UnknownLease::Block)],
        &[("vm1", 1, "guard"), ("vm2", 2, "guard")],
    );
    r.send("vm1", &arp_from(mac(1), SPOOFED, 6));
    assert!(r.take("vm2").is_empty(), "a spoofed ARP claim reached vm2");
    assert_eq!(r.drops("vm1").source_guard, 1);
}

// --- IGMP snooping -----------------------------------------------------------

#[test]
fn multicast_reaches_members_routers_and_non_snooping_ports_only() {
    let r = Rig::new(
        vec![igmp_snooping("mcast"), access("plain")],
        &[
            ("vm1", 1, "mcast"),
            ("vm2", 2, "mcast"),
            ("vm3", 3, "mcast"),
            ("lab", 4, "plain"),
        ],
    );
    let data = multicast(REMOTE_MAC, GROUP, 0);
    r.send_up(&data);
    for p in ["vm1", "vm2", "vm3"] {
        assert!(r.take(p).is_empty(), "{p} got a group nobody joined");
    }
    assert_eq!(
        r.take("lab"),
        vec![data.clone()],
        "lab's group does not snoop"
    );

    r.send(
        "vm1",
        &igmp::report_frame(mac(1), Ipv4Addr::new(10, 0, 0, 11), GROUP, 2),
    );
    r.drain_all();
    let s = r.stats();
    assert_eq!(s.counters.igmp_reports, 1);
    let members: Vec<_> = s
        .groups
        .iter()
        .map(|g| (g.vlan, g.group, g.ports.clone()))
        .collect();
    assert_eq!(members, vec![(VLAN, GROUP, vec![r.id("vm1")])]);

    r.send_up(&data);
    assert_eq!(r.take("vm1"), vec![data.clone()]);
    assert!(r.take("vm2").is_empty() && r.take("vm3").is_empty());
    assert_eq!(r.take("lab").len(), 1);

    // From a VM: the member and the uplink (a router port) get it.
    let from_vm = multicast(mac(3), GROUP, 1);
    r.send("vm3", &from_vm);
    assert_eq!(r.take("vm1"), vec![from_vm.clone()]);
    assert_eq!(r.take_up(), vec![from_vm]);
    assert!(r.take("vm2").is_empty());
    r.drain_all();

    // Fast leave: the port is gone from the group at once.
    r.send(
        "vm1",
        &igmp::leave_frame(mac(1), Ipv4Addr::new(10, 0, 0, 11), GROUP),
    );
    r.drain_all();
    r.send_up(&data);
    assert!(r.take("vm1").is_empty(), "still sent after its leave");
    assert!(r.stats().groups.is_empty());

    // A port a query came from leads to a router: it gets every group.
    r.send(
        "vm2",
        &igmp::general_query_frame(mac(2), Ipv4Addr::new(10, 0, 0, 12), 100),
    );
    r.drain_all();
    assert_eq!(r.stats().counters.igmp_queries_heard, 1);
    r.send_up(&data);
    assert_eq!(r.take("vm2"), vec![data]);
    assert!(r.take("vm1").is_empty() && r.take("vm3").is_empty());
    r.drain_all();

    // Link-local control groups are flooded: hosts never report them.
    let mdns = multicast(REMOTE_MAC, MDNS, 2);
    r.send_up(&mdns);
    for p in ["vm1", "vm2", "vm3", "lab"] {
        assert_eq!(r.take(p), vec![mdns.clone()], "{p}: link-local group");
    }
}

#[test]

fn igmp_reports_go_to_router_ports_only() {
    let r = Rig::new(
        vec![igmp_snooping("mcast")],
        &[("vm1", 1, "mcast"), ("vm2", 2, "mcast")],
    );
    let report = igmp::report_frame(mac(1), Ipv4Addr::new(10, 0, 0, 11), GROUP, 2);
    r.send("vm1", &report);
    assert_eq!(r.take_up(), vec![report], "the router must hear it");
    assert!(r.take("vm2").is_empty(), "another host heard vm1's report");
}

#[test]
fn the_switch_queries_where_no_router_does_and_memberships_expire() {
    let r = Rig::new(
        vec![igmp_snooping("mcast"), access("plain")],
        &[
            ("vm1", 1, "mcast"),
            ("vm2", 2, "mcast"),
            ("lab", 3, "plain"),
        ],
    );
    r.send(
        "vm1",
        &igmp::report_frame(mac(1), Ipv4Addr::new(10, 0, 0, 11), GROUP, 2),
    );
    r.drain_all();
    let t0 = Instant::now();
    r.sw.snoop_age(t0);
    r.sw.snoop_age(t0 + Duration::from_secs(124));
    for p in ["vm1", "vm2", "lab", "up"] {
        assert!(r.take(p).is_empty(), "{p}: a query before the interval");
    }

    r.sw.snoop_age(t0 + Duration::from_secs(125));
    for p in ["vm1", "vm2"] {
        let got = r.take(p);
        assert_eq!(got.len(), 1, "{p}");
        assert!(is_igmp_query(&got[0]), "{p}");
    }
    assert!(r.take("lab").is_empty() && r.take("up").is_empty());
    assert_eq!(r.stats().counters.igmp_queries_sent, 2);

    // A router querying from beyond the uplink makes the switch quiet,
    // although another interval has passed since its last query.
    r.send_up(&igmp::general_query_frame(REMOTE_MAC, REMOTE_IP, 100));
    r.drain_all();
    r.sw.snoop_age(t0 + Duration::from_secs(250));
    for p in ["vm1", "vm2"] {
        assert!(r.take(p).is_empty(), "{p}: queried although a router does");
    }
    assert_eq!(r.stats().counters.igmp_queries_sent, 2);

    // vm1 reported before t0 and never again: 260 s later it is no member.
    assert_eq!(r.stats().groups.len(), 1);
    r.sw.snoop_age(t0 + Duration::from_secs(260));
    assert!(r.stats().groups.is_empty(), "{:?}", r.stats().groups);
}

// --- Association of VM ports ---------------------------------------------

#[test]
fn a_new_vm_gets_no_query_and_no_lease_refresh() {
    let mut r = Rig::down(vec![all_snooping("snoop")], &[("vm1", 1, "snoop")]);
    let id = r.add_vm("vm5", 5, "snoop");
    r.sw.pre_associate(
        id,
        Association {
            migrated: false,
            handover: None,
        },
    )
    .unwrap();
    r.sw.port_up(id);
    assert!(r.take("vm5").is_empty(), "a new VM was queried");
    r.drain_all();
    assert!(r.sw.take_snoop_requests().is_empty());
    let s = r.stats();
    assert_eq!(
        (
            s.counters.triggered_queries,
            s.counters.lease_refreshes_asked
        ),
        (0, 0)
    );
    assert_eq!(s.counters.migrated_associations, 0);
    let view = s.associations.iter().find(|a| a.port == "vm5").unwrap();
    assert!(view.associated && !view.migrated && !view.guard_open);
    // No guard opens for it: it must do DHCP like any new VM.
    r.send("vm5", &ipv4_from(mac(5), LEASED));
    assert!(r.take_up().is_empty());
    assert_eq!(r.drops("vm5").source_guard, 1);
}

#[test]
fn a_migrated_vm_without_handover_gets_one_query_and_a_lease_refresh() {
    let mut r = Rig::new(vec![all_snooping("snoop")], &[("vm1", 1, "snoop")]);
    let id = r.add_vm("vm5", 5, "snoop");
    r.sw.pre_associate(id, migrated(None)).unwrap();
    assert!(r.take("vm5").is_empty(), "queried before it runs here");
    assert!(
        r.sw.take_snoop_requests().is_empty(),
        "asked before it runs here"
    );
    r.sw.port_up(id);

    let got = r.take("vm5");
    assert_eq!(got.len(), 1, "exactly the query");
    let q = igmp::parse_frame(&got[0]).expect("an IGMP frame");
    assert_eq!(q.src_mac, QUERIER_MAC);
    assert_eq!(q.dst_ip, igmp::ALL_SYSTEMS);
    assert_eq!(
        q.msg,
        IgmpMessage::Query {
            version: 3,
            group: Ipv4Addr::UNSPECIFIED,
            max_resp_ds: 10,
        },
        "a general query answered within a second"
    );
    assert!(
        !r.take("vm1").iter().any(|f| is_igmp_query(f)),
        "vm1 was queried"
    );
    assert!(
        !r.take_up().iter().any(|f| is_igmp_query(f)),
        "the uplink was queried"
    );

    let s = r.stats();
    assert_eq!(s.counters.triggered_queries, 1);
    assert_eq!(s.counters.migrated_associations, 1);
    assert_eq!(s.counters.lease_refreshes_asked, 1);
    assert_eq!(
        r.sw.take_snoop_requests(),
        vec![SnoopRequest::LeaseRefresh {
            port: id,
            port_name: "vm5".into(),
            mac: mac(5),
            vlan: VLAN,
            client_id: None,
            servers: vec![SERVER_IP, OTHER_SERVER_IP],
            ip_hint: None,
        }]
    );
    assert!(r.sw.take_snoop_requests().is_empty(), "taken once");
    // A second port_up (its rings restarted) is not a second arrival.
    r.sw.port_up(id);
    assert!(!r.take("vm5").iter().any(|f| is_igmp_query(f)));
    assert!(r.sw.take_snoop_requests().is_empty());
    assert_eq!(r.stats().counters.triggered_queries, 1);
}

#[test]
fn a_migrated_vm_with_a_handover_gets_its_binding_and_groups_back() {
    let mut r = Rig::new(vec![all_snooping("snoop")], &[("vm1", 1, "snoop")]);
    let id = r.add_vm("vm5", 5, "snoop");
    r.sw.pre_associate(id, migrated(Some(vm5_handover())))
        .unwrap();
    r.sw.port_up(id);

    let s = r.stats();
    assert_eq!(s.bindings.len(), 1);
    let b = &s.bindings[0];
    assert_eq!(
        (b.mac, b.ip, b.vlan, b.port, b.server),
        (mac(5), LEASED, VLAN, id, Some(SERVER_IP)),
        "installed on this host's VLAN and port"
    );
    assert!((1799..=1800).contains(&lease_of(b)), "lease carried: {b:?}");
    assert_eq!(b.client_id, handed_over_binding().client_id);
    let members: Vec<_> = s
        .groups
        .iter()
        .map(|g| (g.vlan, g.group, g.ports.clone()))
        .collect();
    assert_eq!(members, vec![(VLAN, GROUP, vec![id])]);
    assert_eq!(s.counters.bindings_handed_over, 1);
    assert_eq!(s.counters.lease_refreshes_asked, 0);
    assert!(
        r.sw.take_snoop_requests().is_empty(),
        "a binding came along"
    );
    assert_eq!(
        s.counters.triggered_queries, 1,
        "groups are still confirmed"
    );
    let view = s.associations.iter().find(|a| a.port == "vm5").unwrap();
    assert!(view.migrated && view.associated && !view.guard_open);
    r.drain_all();

    // Both work at once: its address passes the guard, its group reaches it.
    let ok = ipv4_from(mac(5), LEASED);
    r.send("vm5", &ok);
    assert_eq!(r.take_up(), vec![ok]);
    let data = multicast(REMOTE_MAC, GROUP, 0);
    r.send_up(&data);
    assert_eq!(r.take("vm5"), vec![data]);
    assert!(r.take("vm1").is_empty());
}

#[test]
fn de_associate_returns_the_ports_state_and_removes_it() {
    let mut r = Rig::new(vec![all_snooping("snoop")], &[("vm1", 1, "snoop")]);
    let id = r.add_vm("vm5", 5, "snoop");
    r.sw.pre_associate(id, migrated(Some(vm5_handover())))
        .unwrap();
    r.sw.port_up(id);
    // vm1's own state must survive vm5's departure.
    r.send(
        "vm1",
        &igmp::report_frame(mac(1), Ipv4Addr::UNSPECIFIED, GROUP, 3),
    );
    r.drain_all();

    let state = r.sw.de_associate(id);
    assert_eq!(state.mac, mac(5));
    assert_eq!(state.groups, vec![GROUP]);
    assert_eq!(state.bindings.len(), 1);
    assert_eq!((state.bindings[0].ip, state.bindings[0].port), (LEASED, id));

    let s = r.stats();
    assert!(s.bindings.is_empty(), "{:?}", s.bindings);
    let members: Vec<_> = s.groups.iter().map(|g| g.ports.clone()).collect();
    assert_eq!(members, vec![vec![r.id("vm1")]]);
    assert!(s.associations.iter().all(|a| a.port != "vm5"));
    assert_eq!(s.counters.de_associations, 1);
    assert_eq!(r.sw.net_state(id).bindings, vec![]);

    r.send_up(&multicast(REMOTE_MAC, GROUP, 0));
    assert!(r.take("vm5").is_empty(), "a group of a de-associated port");
    assert_eq!(r.take("vm1").len(), 1);
}

#[test]
fn handed_over_servers_come_first_and_an_ended_lease_asks_dhcp() {
    let mut r = Rig::new(vec![all_snooping("snoop")], &[]);
    let id = r.add_vm("vm5", 5, "snoop");
    let named = Ipv4Addr::new(10, 9, 9, 9);
    let ended = BindingRecord {
        lease_remaining_s: Some(0),
        server: Some(named),
        ..handed_over_binding()
    };
    let handover = NicNetState {
        mac: mac(5),
        bindings: vec![ended],
        groups: vec![],
    };
    r.sw.pre_associate(id, migrated(Some(handover))).unwrap();
    r.sw.port_up(id);
    assert!(
        r.stats().bindings.is_empty(),
        "an ended lease was installed"
    );
    assert_eq!(
        r.sw.take_snoop_requests(),
        vec![SnoopRequest::LeaseRefresh {
            port: id,
            port_name: "vm5".into(),
            mac: mac(5),
            vlan: VLAN,
            client_id: Some(client_id(mac(5))),
            servers: vec![named, SERVER_IP, OTHER_SERVER_IP],
            ip_hint: Some(LEASED),
        }]
    );
}

#[test]
fn an_unknown_lease_opens_the_guard_under_open_and_not_under_block() {
    let mut r = Rig::new(
        vec![
            all_snooping("open"),
            source_guard("block", UnknownLease::Block),
        ],
        &[],
    );
    let open = r.add_vm("vm5", 5, "open");
    let block = r.add_vm("vm6", 6, "block");
    for id in [open, block] {
        r.sw.pre_associate(id, migrated(None)).unwrap();
        r.sw.port_up(id);
    }
    assert_eq!(r.sw.take_snoop_requests().len(), 2);
    r.sw.lease_unknown(open, "LEASEUNKNOWN from 10.0.0.2");
    r.sw.lease_unknown(block, "LEASEUNKNOWN from 10.0.0.2");
    r.drain_all();
    let s = r.stats();
    assert_eq!(s.counters.leases_unknown, 2);
    let guard_open: Vec<_> = s
        .associations
        .iter()
        .map(|a| (a.port.as_str(), a.guard_open))
        .collect();
    assert_eq!(guard_open, vec![("vm5", true), ("vm6", false)]);

    let from_open = ipv4_from(mac(5), LEASED);
    r.send("vm5", &from_open);
    assert_eq!(r.take_up(), vec![from_open], "open: the VM sends as before");
    let from_block = ipv4_from(mac(6), SPOOFED);
    r.send("vm6", &from_block);
    assert!(r.take_up().is_empty(), "block: held to DHCP");
    assert_eq!(r.drops("vm6").source_guard, 1);
    assert_eq!(r.drops("vm5").source_guard, 0);

    // The held VM's DHCP goes out, and its ACK lets it send.
    r.send("vm6", &discover(mac(6)));
    assert_eq!(r.take_up().len(), 1);
    r.send_up(&server_msg(
        SERVER_MAC,
        mac(6),
        MessageType::Ack,
        mac(6),
        SPOOFED,
    ));
    r.send("vm6", &from_block);
    assert_eq!(r.take_up(), vec![from_block]);

    // The open VM's guard closes once a binding vouches for it.
    r.send_up(&server_msg(
        SERVER_MAC,
        mac(5),
        MessageType::Ack,
        mac(5),
        LEASED,
    ));
    assert!(!r.stats().associations.iter().any(|a| a.guard_open));
    r.send("vm5", &ipv4_from(mac(5), Ipv4Addr::new(10, 0, 0, 99)));
    assert!(r.take_up().is_empty(), "an address other than its binding");
    assert_eq!(r.drops("vm5").source_guard, 1);
}

// --- Switchover ------------------------------------------------------------

/// vm1 migrating: held, then its rings stop.
fn departing_vm1() -> Rig {
    let r = Rig::new(vec![access("web")], &[("vm1", 1, "web"), ("vm2", 2, "web")]);
    r.sw.switchover_hold(r.id("vm1"));
    r.sw.port_down(r.id("vm1"));
    r
}

#[test]
fn a_departing_vm_keeps_its_frames_bounded_and_in_order_when_it_stays() {
    let r = departing_vm1();
    let sent: Vec<Vec<u8>> = (0..QUEUE as u8 + 4)
        .map(|n| numbered(mac(1), REMOTE_MAC, n))
        .collect();
    for f in &sent {
        r.send_up(f);
    }
    assert_eq!(r.drops("vm1").queue_full, 4, "the queue keeps its bound");
    assert_eq!(
        r.drops("vm1").no_buffer,
        0,
        "nothing dropped for the port being down"
    );
    assert!(r.take_up().is_empty() && r.take("vm2").is_empty());
    let pinned =
        r.sw.fdb_entries()
            .into_iter()
            .any(|e| e.port == r.id("vm1"));
    assert!(pinned, "its address stays here during the switchover");

    assert_eq!(r.sw.switchover_stay(r.id("vm1")), QUEUE);
    assert_eq!(r.stats().counters.switchover_delivered, QUEUE as u64);
    assert_eq!(
        r.take("vm1"),
        sent[..QUEUE].to_vec(),
        "the oldest, in order"
    );
    assert!(r.take_up().is_empty(), "nothing forwarded elsewhere");
}

#[test]
fn a_moved_vm_s_frames_leave_through_the_uplink_in_order_once_it_is_announced_there() {
    let r = departing_vm1();
    let mut sent = Vec::new();
    for n in 0..3 {
        let f = numbered(mac(1), REMOTE_MAC, n);
        r.send_up(&f);
        sent.push(f);
    }
    let local = numbered(mac(1), mac(2), 3);
    r.send("vm2", &local);
    sent.push(local);
    assert!(
        r.take_up().is_empty(),
        "queued, not forwarded, before it moved"
    );

    // The destination has not announced the VM yet: the network beyond
    // would send the frames straight back, so they wait, and so do the
    // ones that still arrive for the VM.
    assert_eq!(r.sw.switchover_moved(r.id("vm1")), 4);
    let straggler = numbered(mac(1), REMOTE_MAC, 4);
    r.send_up(&straggler);
    sent.push(straggler);
    let local_late = numbered(mac(1), mac(2), 5);
    r.send("vm2", &local_late);
    sent.push(local_late);
    assert!(r.take_up().is_empty(), "sent before the VM was announced");
    assert!(r.take("vm1").is_empty() && r.take("vm2").is_empty());

    // Its announcement from the new host comes in through the uplink.
    r.send_up(&arp_from(mac(1), LEASED, 1));
    r.take("vm2");
    assert_eq!(r.take_up(), sent, "to the VM's new host, in order");
    assert!(r.take("vm1").is_empty());
    assert!(
        r.sw.fdb_entries().iter().all(|e| e.port != r.id("vm1")),
        "its address is no longer here"
    );
    assert_eq!(r.stats().counters.switchover_forwarded, 6);

    // From now on frames for it go out of the uplink directly.
    let later = numbered(mac(1), mac(2), 9);
    r.send("vm2", &later);
    assert_eq!(r.take_up(), vec![later]);
    assert!(r.take("vm1").is_empty());
}

#[test]
fn a_vm_announced_from_its_new_host_before_the_switchover_ends_gets_its_frames_at_once() {
    let r = departing_vm1();
    let held = numbered(mac(1), REMOTE_MAC, 0);
    r.send_up(&held);
    // The announcement does not move the pinned address (a spoofer's
    // would not either), but it is remembered.
    r.send_up(&arp_from(mac(1), LEASED, 1));
    r.take("vm2");
    assert!(r.take_up().is_empty());
    assert!(r
        .sw
        .fdb_entries()
        .iter()
        .any(|e| e.mac == mac(1).to_string() && e.port == r.id("vm1")));

    assert_eq!(r.sw.switchover_moved(r.id("vm1")), 1);
    assert_eq!(r.take_up(), vec![held]);
    assert_eq!(r.stats().counters.switchover_forwarded, 1);
}

#[test]
fn a_moved_vm_never_announced_gets_its_frames_after_the_bound() {
    let r = departing_vm1();
    let held = numbered(mac(1), REMOTE_MAC, 0);
    r.send_up(&held);
    let t0 = Instant::now();
    assert_eq!(r.sw.switchover_moved(r.id("vm1")), 1);
    r.sw.snoop_age(t0);
    assert!(r.take_up().is_empty(), "forwarded before the bound");
    r.sw.snoop_age(t0 + snoop::MOVE_ANNOUNCE_BOUND + Duration::from_millis(1));
    assert_eq!(r.take_up(), vec![held], "flooded out of the uplink");
    assert!(r.take("vm2").is_empty(), "vm2 cannot own the address");
    assert_eq!(r.stats().counters.switchover_forwarded, 1);
}

#[test]

fn a_moved_vm_s_queued_broadcasts_are_not_flooded_again() {
    let r = departing_vm1();
    let arp = arp_from(REMOTE_MAC, REMOTE_IP, 1);
    r.send_up(&arp);
    assert_eq!(r.take("vm2"), vec![arp], "flooded once, as it came");

    r.sw.switchover_moved(r.id("vm1"));
    assert!(
        r.take("vm2").is_empty(),
        "vm2 got the broadcast a second time"
    );
    assert!(
        r.take_up().is_empty(),
        "the broadcast went back where it came from"
    );
}

#[test]
fn an_arriving_vm_gets_what_came_for_it_before_its_rings_ran_newest_kept() {
    let mut r = Rig::new(vec![all_snooping("snoop")], &[("vm1", 1, "snoop")]);
    let id = r.add_vm("vm5", 5, "snoop");
    r.sw.pre_associate(id, migrated(Some(vm5_handover())))
        .unwrap();
    // The downtime: its group's datagrams and a broadcast arrive before
    // its rings run; one more than the queue holds.
    let mut sent: Vec<Vec<u8>> = (0..QUEUE as u8)
        .map(|n| multicast(REMOTE_MAC, GROUP, n))
        .collect();
    sent.push(arp_from(REMOTE_MAC, REMOTE_IP, 1));
    for f in &sent {
        r.send_up(f);
    }
    assert!(
        r.take("vm1").iter().all(|f| f == &sent[QUEUE]),
        "vm1 did not join"
    );
    assert_eq!(r.drops("vm5").queue_full, 1, "the oldest made room");
    // A port_down before it was ever up keeps them.
    r.sw.port_down(id);

    r.sw.port_up(id);
    let got = r.take("vm5");
    let delivered: Vec<&Vec<u8>> = got.iter().filter(|f| sent.contains(f)).collect();
    assert_eq!(
        delivered,
        sent[1..].iter().collect::<Vec<_>>(),
        "newest, in order"
    );

    // Up now: an ordinary port again.
    r.sw.port_down(id);
    r.send_up(&multicast(REMOTE_MAC, GROUP, 99));
    assert!(r.take("vm5").is_empty());
}

#[test]
fn a_new_vm_s_port_queues_nothing_before_it_runs() {
    let mut r = Rig::new(vec![all_snooping("snoop")], &[("vm1", 1, "snoop")]);
    let id = r.add_vm("vm5", 5, "snoop");
    r.sw.pre_associate(id, Association::default()).unwrap();
    r.send_up(&arp_from(REMOTE_MAC, REMOTE_IP, 1));
    r.sw.port_up(id);
    let got = r.take("vm5");
    assert!(
        !got.contains(&arp_from(REMOTE_MAC, REMOTE_IP, 1)),
        "a frame from before it ran"
    );
}
