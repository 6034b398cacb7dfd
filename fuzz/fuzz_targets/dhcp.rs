//! Bytes from a guest or the wire as a DHCP frame, a bare BOOTP payload
//! and an IP source guard claim, and whatever parses fed to a small DHCP
//! snooping binding table from both sides: no panic, a parsed message
//! reads back the same once written out, and the table stays within its
//! limit.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tandem_switch::dhcp::{self, BindingTable};

const TABLE_LIMIT: usize = 4;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut table = BindingTable::new(TABLE_LIMIT);
    let _ = dhcp::is_dhcp(data);
    let _ = dhcp::ipv4_claim(data);
    let from_frame = dhcp::parse_frame(data).map(|f| f.msg);
    let bare = dhcp::parse_bootp(data).ok();
    for msg in from_frame.iter().chain(bare.iter()) {
        assert_eq!(dhcp::parse_bootp(&dhcp::encode(msg)).as_ref(), Ok(msg));
        table.observe_client(1, 1, msg, now);
        table.observe_server(1, 1, msg, now);
        table.observe_client(1, 2, msg, now + Duration::from_secs(1));
        for rec in table.records(now) {
            table.install(&rec, 3, now);
        }
        assert!(table.len() <= TABLE_LIMIT);
    }
    table.age(now + Duration::from_secs(u64::from(u32::MAX)));
});
