//! Arbitrary bytes as the replication link delivers them, framed and
//! unframed, into every parser and the backup's epoch assembler; and valid
//! epochs with a byte flipped, which must never be accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_replication::fuzzing::replication_stream;

fuzz_target!(|data: &[u8]| {
    replication_stream(data);
});
