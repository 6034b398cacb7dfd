//! Arbitrary guest memory and descriptor tables through a VM port's
//! transmit path: no panic, no access outside guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_switch::vhost::fuzz_tx_chain(data);
});
