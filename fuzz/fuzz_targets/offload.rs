//! A guest's virtio-net header and frame through offload validation and
//! the software segmentation fallback: refused, or finished into frames
//! that fit a wire and carry exactly the packet's payload.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_switch::fuzzing::offload_packet(data);
});
