//! The forwarding core's tests, on a switch with four VM ports and a trunk
//! uplink and no I/O.

use super::*;
use crate::config::VlanMode;
use crate::port::Ingress;

fn doc() -> SwitchDocument {
    let mut web = PortGroup::named("web");
    web.vlan = Some(10);
    let mut db = PortGroup::named("db");
    db.vlan = Some(20);
    let mut trunk = PortGroup::named("trunk");
    trunk.vlan_mode = VlanMode::Trunk;
    trunk.allowed_vlans = vec![10, 20];
    let mut spy = PortGroup::named("spy");
    spy.vlan = Some(10);
    spy.allow_promiscuous = true;
    SwitchDocument {
        port_groups: vec![web, db, trunk, spy],
        ..Default::default()
    }
}

fn mac(n: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0, n])
}

fn eth(dst: Mac, src: Mac) -> Vec<u8> {
    let mut f = dst.0.to_vec();
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(60, 0x5a);
    f
}

struct Rig {
    sw: Arc<Switch>,
    q: HashMap<&'static str, (PortId, Arc<EgressQueue>, Arc<PortCounters>)>,
}

impl Rig {
    fn new() -> Self {
        let sw = Switch::new(doc()).unwrap();
        let mut q = HashMap::new();
        for (name, n, group) in [
            ("vm1", 1, "web"),
            ("vm2", 2, "web"),
            ("vm3", 3, "web"),
            ("vm4", 4, "db"),
        ] {
            let kind = PortKind::Vm {
                vm: name.into(),
                nic: 0,
                mac: mac(n),
            };
            q.insert(name, sw.add_port(name, kind, group).unwrap());
        }
        q.insert("up", sw.add_port("up", PortKind::Uplink, "trunk").unwrap());
        for (id, _, _) in q.values() {
            sw.port_up(*id);
        }
        // Discard the announcements port_up flooded.
        for (_, e, _) in q.values() {
            e.clear();
        }
        Rig { sw, q }
    }
    fn send(&self, port: &str, f: &[u8]) {
        self.sw.ingress(self.q[port].0, f);
    }
    fn take(&self, port: &str) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.q[port].1.pop().map(|p| p.frame)).collect()
    }
}

#[test]
fn offloaded_packets_go_whole_only_where_accepted() {
    use crate::offload::{self, RxOffloads, TxOffloads, VnetHdr};
    let r = Rig::new();
    r.q["vm2"].1.set_accepts(RxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
    });
    let mut f = offload::tso_packet(false, false, &[7; 4000], 0x18);
    f[..6].copy_from_slice(&Mac::BROADCAST.0);
    f[6..12].copy_from_slice(&mac(1).0);
    let h = VnetHdr {
        flags: offload::VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: offload::VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    let all = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
    };
    let off = offload::from_tx(&h, &f, all).unwrap();
    r.sw.ingress_offloaded(r.q["vm1"].0, &f, off);

    let whole: Vec<_> = std::iter::from_fn(|| r.q["vm2"].1.pop()).collect();
    assert_eq!(whole.len(), 1, "one packet for the guest that takes TSO");
    assert_eq!((&whole[0].frame, whole[0].offload), (&f, off));
    let segs = r.take("vm3");
    assert_eq!(segs.len(), 3, "segmented for the guest that does not");
    assert!(segs.iter().all(|s| s.len() <= crate::port::MAX_FRAME));
    let up = r.take("up");
    assert_eq!(up.len(), 3, "segmented for the wire");
    for (u, s) in up.iter().zip(&segs) {
        assert_eq!(frame::parse(u).unwrap().vid, Some(10));
        assert_eq!(&frame::pop_tag(u), s);
    }
    let c = r.q["vm1"].2.snapshot();
    assert_eq!(c.drops, Default::default());
}

#[test]
fn uplink_member_change_announces_every_vm_on_the_uplink_only() {
    let r = Rig::new();
    r.sw.port_down(r.q["vm3"].0);
    r.sw.uplink_active_changed(r.q["up"].0);
    let mut seen: Vec<(u16, Mac)> = r
        .take("up")
        .iter()
        .map(|f| {
            let i = frame::parse(f).unwrap();
            assert_eq!(i.ethertype, frame::ETHERTYPE_RARP);
            assert_eq!(i.dst, Mac::BROADCAST);
            (i.vid.unwrap(), i.src)
        })
        .collect();
    seen.sort();
    // vm3 is down; vm1/vm2 are in VLAN 10, vm4 in VLAN 20.
    assert_eq!(seen, vec![(10, mac(1)), (10, mac(2)), (20, mac(4))]);
    for vm in ["vm1", "vm2", "vm3", "vm4"] {
        assert!(r.take(vm).is_empty(), "{vm} got an announcement");
    }
}

#[test]
fn broadcast_floods_within_the_vlan_and_tags_on_trunks() {
    let r = Rig::new();
    let f = eth(Mac::BROADCAST, mac(1));
    r.send("vm1", &f);
    assert_eq!(
        r.take("vm1"),
        Vec::<Vec<u8>>::new(),
        "never back to the sender"
    );
    assert_eq!(r.take("vm2"), vec![f.clone()]);
    assert_eq!(r.take("vm3"), vec![f.clone()]);
    assert!(r.take("vm4").is_empty(), "other VLAN");
    let up = r.take("up");
    assert_eq!(up.len(), 1);
    assert_eq!(frame::parse(&up[0]).unwrap().vid, Some(10));
    assert_eq!(frame::pop_tag(&up[0]), f);
}

#[test]
fn pinned_vm_macs_get_unicast_without_flooding() {
    let r = Rig::new();
    let f = eth(mac(2), mac(1));
    r.send("vm1", &f);
    assert_eq!(r.take("vm2"), vec![f]);
    assert!(r.take("vm3").is_empty());
    assert!(r.take("up").is_empty());
}

#[test]
fn tagged_frames_from_the_uplink_reach_their_vlan_untagged() {
    let r = Rig::new();
    let outside = Mac([2, 0, 0, 0, 0, 0x99]);
    let f = eth(mac(4), outside);
    r.send("up", &frame::push_tag(&f, 20));
    assert_eq!(r.take("vm4"), vec![f.clone()]);
    // The reply goes back to the learned port, tagged.
    r.send("vm4", &eth(outside, mac(4)));
    let back = r.take("up");
    assert_eq!(back.len(), 1);
    assert_eq!(frame::parse(&back[0]).unwrap().vid, Some(20));
    // A VLAN the trunk does not carry is dropped and counted.
    r.send("up", &frame::push_tag(&f, 30));
    assert_eq!(r.q["up"].2.snapshot().drops.vlan, 1);
    assert!(r.take("vm4").is_empty());
}

#[test]
fn access_ports_refuse_tags_and_spoofed_sources() {
    let r = Rig::new();
    r.send("vm1", &frame::push_tag(&eth(Mac::BROADCAST, mac(1)), 10));
    r.send("vm1", &eth(Mac::BROADCAST, mac(77)));
    r.send("vm1", &[0u8; 10]);
    let d = r.q["vm1"].2.snapshot().drops;
    assert_eq!((d.vlan, d.security, d.malformed), (1, 1, 1));
    assert!(r.take("vm2").is_empty());
}

#[test]
fn promiscuous_ports_see_their_vlans_unicast() {
    let r = Rig::new();
    let (spy, q, _) =
        r.sw.add_port(
            "spy",
            PortKind::Vm {
                vm: "spy".into(),
                nic: 0,
                mac: mac(9),
            },
            "spy",
        )
        .unwrap();
    r.sw.port_up(spy);
    q.clear();
    let f = eth(mac(2), mac(1));
    r.send("vm1", &f);
    assert_eq!(q.pop().map(|p| p.frame), Some(f));
}

#[test]
fn gate_holds_and_releases() {
    struct HoldAll(Mutex<Vec<Vec<u8>>>);
    impl FrameGate for HoldAll {
        fn check(&self, _: PortId, f: &[u8]) -> GateDecision {
            self.0.lock().push(f.to_vec());
            GateDecision::Hold
        }
    }
    let r = Rig::new();
    let gate = Arc::new(HoldAll(Mutex::new(vec![])));
    r.sw.set_gate(r.q["vm1"].0, Some(gate.clone()));
    let f = eth(mac(2), mac(1));
    r.send("vm1", &f);
    assert!(r.take("vm2").is_empty(), "held");
    let held = gate.0.lock().pop().unwrap();
    r.sw.release(r.q["vm1"].0, &held);
    assert_eq!(r.take("vm2"), vec![f]);
}

#[test]
fn a_full_queue_drops_only_for_its_port() {
    let r = Rig::new();
    let f = eth(Mac::BROADCAST, mac(1));
    for _ in 0..2000 {
        r.send("vm1", &f);
    }
    assert!(r.q["vm2"].2.snapshot().drops.queue_full > 0);
    assert_eq!(r.take("vm3").len(), crate::config::DEFAULT_QUEUE_FRAMES);
}

#[test]
fn invalid_documents_change_nothing() {
    let r = Rig::new();
    let before = r.sw.document();
    let mut bad = doc();
    bad.port_groups.retain(|g| g.name != "db");
    let e = r.sw.set_document(bad).unwrap_err();
    assert!(e.to_string().contains("vm vm4 nic 0"), "{e}");
    assert_eq!(r.sw.document(), before);
}

#[test]
fn shaping_in_makes_a_guest_wait_and_polices_an_uplink() {
    let mut d = doc();
    let policy = crate::shaper::ShapingPolicy {
        average_kbps: 1000,
        peak_kbps: 2000,
        burst_bytes: 3000,
    };
    d.port_groups[0].shaping_in = Some(policy);
    d.port_groups[2].shaping_in = Some(policy);
    let r = Rig::new();
    r.sw.set_document(d).unwrap();
    // A guest is asked to wait, not dropped: 60-byte frames until the
    // buckets are in debt, then a wait of about one frame's worth.
    let (vm1, t0) = (r.q["vm1"].0, Instant::now());
    let mut allowed = 0;
    let wait = loop {
        match r.sw.reserve_tx(vm1, 60, t0) {
            Ok(()) => allowed += 1,
            Err(w) => break w,
        }
        assert!(allowed < 1000);
    };
    assert!((10..=60).contains(&allowed), "{allowed} frames in a burst");
    assert!(wait <= Duration::from_millis(1), "{wait:?}");
    assert_eq!(r.sw.reserve_tx(vm1, 60, t0 + wait), Ok(()));
    assert_eq!(
        r.sw.reserve_tx(r.q["vm4"].0, 60, t0),
        Ok(()),
        "unshaped group"
    );
    // What a guest sends was shaped already: not policed again.
    let f = eth(Mac::BROADCAST, mac(1));
    for _ in 0..100 {
        r.send("vm1", &f);
    }
    assert_eq!(r.take("vm2").len(), 100);
    // An uplink cannot be made to wait: it is policed.
    let mut g = frame::push_tag(&eth(Mac::BROADCAST, mac(9)), 10);
    g.resize(1000, 0);
    for _ in 0..100 {
        r.send("up", &g);
    }
    let got = r.take("vm2").len();
    assert!(
        (1..=5).contains(&got),
        "{got} frames passed a 3000-byte burst"
    );
    assert!(r.q["up"].2.snapshot().drops.shaped >= 90);
}

#[test]
fn a_blocked_group_forwards_nothing_either_way_until_unblocked() {
    let r = Rig::new();
    let ids: Vec<PortId> = ["vm1", "vm2", "vm3", "vm4", "up"]
        .iter()
        .map(|n| r.q[n].0)
        .collect();
    let blocked = |port: &str| r.q[port].2.snapshot().drops.blocked;
    // A frame already waiting to leave vm2 does not leave after the block.
    assert!(r.q["vm2"].1.push(eth(mac(2), mac(9))));

    let mut d = doc();
    d.port_groups[0].blocked = true; // web: vm1..vm3
    r.sw.set_document(d).unwrap();
    assert!(r.take("vm2").is_empty(), "queued before the block");
    assert_eq!(blocked("vm2"), 1);

    // Out of a blocked port: nothing, counted on the sender.
    r.send("vm1", &eth(Mac::BROADCAST, mac(1)));
    r.send("vm1", &eth(mac(4), mac(1)));
    assert_eq!(blocked("vm1"), 2);
    for p in ["vm2", "vm3", "vm4", "up"] {
        assert!(r.take(p).is_empty(), "{p} got a blocked port's frame");
    }
    // Into blocked ports: nothing, counted on each of them; the other
    // VLAN of the trunk still works.
    let b10 = frame::push_tag(&eth(Mac::BROADCAST, mac(20)), 10);
    r.send("up", &b10);
    for p in ["vm1", "vm2", "vm3"] {
        assert!(r.take(p).is_empty(), "{p} is blocked");
    }
    assert_eq!((blocked("vm1"), blocked("vm3")), (3, 1));
    assert!(r.take("vm4").is_empty(), "VLAN 20");
    let b20 = frame::push_tag(&eth(Mac::BROADCAST, mac(21)), 20);
    r.send("up", &b20);
    assert_eq!(r.take("vm4").len(), 1, "db is not blocked");
    // Unicast to a pinned MAC behind a blocked port is not flooded
    // elsewhere either.
    r.send("up", &frame::push_tag(&eth(mac(1), mac(20)), 10));
    assert_eq!(blocked("vm1"), 4);
    // A blocked port's frame held by the gate is not released into the
    // switch either.
    r.sw.release(r.q["vm2"].0, &eth(Mac::BROADCAST, mac(2)));
    assert!(r.take("vm3").is_empty() && r.take("up").is_empty());
    // A blocked uplink: nothing in, nothing out, no announcements.
    let mut d = doc();
    d.port_groups[2].blocked = true; // trunk: up
    r.sw.set_document(d).unwrap();
    r.send("up", &b20);
    assert!(r.take("vm4").is_empty());
    assert_eq!(blocked("up"), 1);
    r.send("vm4", &eth(Mac::BROADCAST, mac(4)));
    assert!(r.take("up").is_empty());
    assert_eq!(blocked("up"), 2);
    r.sw.uplink_active_changed(r.q["up"].0);
    assert!(r.take("up").is_empty(), "no RARPs out of a blocked uplink");

    // Unblocked: the same ports (nothing recreated) forward again.
    r.sw.set_document(doc()).unwrap();
    let again: Vec<PortId> = ["vm1", "vm2", "vm3", "vm4", "up"]
        .iter()
        .map(|n| r.sw.port_id(n).unwrap())
        .collect();
    assert_eq!(again, ids);
    let f = eth(Mac::BROADCAST, mac(1));
    r.send("vm1", &f);
    assert_eq!(r.take("vm2"), vec![f.clone()]);
    assert_eq!(r.take("vm3"), vec![f.clone()]);
    assert_eq!(r.take("up"), vec![frame::push_tag(&f, 10)]);
    r.send("up", &b20);
    assert_eq!(r.take("vm4").len(), 1);
}

#[test]
fn frames_over_a_ports_mtu_are_dropped_both_ways() {
    use crate::config::UplinkSpec;
    use crate::offload::{self, RxOffloads, TxOffloads, VnetHdr};
    let r = Rig::new();
    let with_mtu = |mtu: Option<u32>| {
        let mut d = doc();
        d.uplinks.push(UplinkSpec {
            name: "up".into(),
            interfaces: vec!["eth9".into()],
            port_group: "trunk".into(),
            mtu,
            neighbour: None,
        });
        d
    };
    r.sw.set_document(with_mtu(Some(1000))).unwrap();
    let sized = |l3: usize| {
        let mut f = eth(Mac::BROADCAST, mac(1));
        f.resize(14 + l3, 0x5a);
        f
    };
    // 1000 bytes of payload fit (the uplink's tag does not count)…
    r.send("vm1", &sized(1000));
    assert_eq!(r.take("up").len(), 1);
    // …1001 do not leave the uplink, and still reach the VMs, which
    // have no MTU of their own.
    r.send("vm1", &sized(1001));
    assert!(r.take("up").is_empty());
    assert_eq!(r.take("vm2").len(), 2);
    let up = |r: &Rig| r.q["up"].2.snapshot().drops.mtu;
    assert_eq!(up(&r), 1);
    // In from the uplink: the same limit.
    let mut t = frame::push_tag(&sized(1001), 10);
    t[6..12].copy_from_slice(&mac(30).0);
    r.send("up", &t);
    assert_eq!(up(&r), 2);
    assert!(r.take("vm2").is_empty());
    let mut t = frame::push_tag(&sized(1000), 10);
    t[6..12].copy_from_slice(&mac(31).0);
    r.send("up", &t);
    assert_eq!(r.take("vm2").len(), 1);
    assert_eq!(up(&r), 2);

    // A TSO packet handed over whole is judged by its segments.
    r.q["up"].1.set_accepts(RxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
    });
    let mut f = offload::tso_packet(false, false, &[7; 4000], 0x18);
    f[..6].copy_from_slice(&Mac::BROADCAST.0);
    f[6..12].copy_from_slice(&mac(1).0);
    let h = VnetHdr {
        flags: offload::VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: offload::VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    let all = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
    };
    let off = offload::from_tx(&h, &f, all).unwrap();
    r.sw.ingress_offloaded(r.q["vm1"].0, &f, off);
    assert!(r.take("up").is_empty(), "1488-byte segments over MTU 1000");
    assert_eq!(up(&r), 3);
    r.sw.set_document(with_mtu(Some(1500))).unwrap();
    r.sw.ingress_offloaded(r.q["vm1"].0, &f, off);
    let whole: Vec<_> = std::iter::from_fn(|| r.q["up"].1.pop()).collect();
    assert_eq!(whole.len(), 1, "segments of 1488 fit 1500");
    // No MTU in the document: no limit of the port's own.
    r.sw.set_document(with_mtu(None)).unwrap();
    r.send("vm1", &sized(1500));
    assert_eq!(r.take("up").len(), 1);
    assert_eq!(up(&r), 3);
}
