//! Arbitrary frames into the forwarding core from every kind of port:
//! no panic, and nothing leaves a port that the policy forbids.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_switch::fuzzing::ingress_frames;

fuzz_target!(|data: &[u8]| {
    ingress_frames(data);
});
