//! Bytes from the wire as an LLDPDU (alone and behind an LLDP frame's
//! header) through the parser and an uplink's neighbour table: refused, or
//! bounded printable text that reads back the same once written out.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_switch::fuzzing::lldp_frames(data);
});
