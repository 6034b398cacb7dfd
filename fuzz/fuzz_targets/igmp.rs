//! Bytes from a guest or the wire as an IGMP message (alone, behind
//! Ethernet/IPv4 headers, and as a whole frame) through the parser and the
//! snooping table: refused, or read back the same once written out, and
//! the table never holds more than its limit.
#![no_main]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tandem_switch::frame::Mac;
use tandem_switch::igmp::{self, IgmpMessage, MembershipTable};

const LIMIT: usize = 8;

fuzz_target!(|data: &[u8]| {
    let msg = igmp::parse_igmp(data);

    // The same bytes as the payload of a well-formed frame: the headers
    // change nothing.
    let mut f = igmp::leave_frame(
        Mac([2, 0, 0, 0, 0, 1]),
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(239, 1, 1, 1),
    );
    f.truncate(14 + 24);
    if let Ok(total) = u16::try_from(24 + data.len()) {
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(data);
        assert!(igmp::is_igmp(&f));
        assert_eq!(igmp::parse_frame(&f).map(|g| g.msg), msg.clone().ok());
    }

    // The bytes as a whole frame, as a port might receive them.
    let whole = igmp::parse_frame(data);
    if whole.is_some() {
        assert!(igmp::is_igmp(data));
    }
    if let Some(g) = igmp::ipv4_multicast_destination(data) {
        assert!(g.is_multicast());
    }

    let mut table = MembershipTable::new(LIMIT, Duration::from_secs(260), Duration::from_secs(255));
    let now = Instant::now();
    for (i, m) in msg.iter().chain(whole.as_ref().map(|w| &w.msg)).enumerate() {
        if let IgmpMessage::Report { .. }
        | IgmpMessage::Leave { .. }
        | IgmpMessage::ReportV3 { .. } = m
        {
            assert_eq!(igmp::parse_igmp(&igmp::encode_igmp(m)).as_ref(), Ok(m));
        }
        for port in 0..3 {
            table.observe(i as u16, port, m, now);
            assert!(table.len() <= LIMIT);
        }
        if let IgmpMessage::ReportV3 { records } = m {
            for r in records {
                let _ = table.targets(0, r.group, now);
            }
        }
    }
    for e in table.entries(now) {
        assert!(!igmp::is_link_local_group(e.group) && e.group.is_multicast());
        assert_eq!(e.ports.len(), e.expires_in_s.len());
    }
    let held = table.len();
    assert_eq!((0..3).map(|p| table.remove_port(p)).sum::<usize>(), held);
    assert!(table.is_empty());
});
