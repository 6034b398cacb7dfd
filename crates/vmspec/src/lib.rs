//! VM specifications: the TOML document an operator writes, its complete
//! validation, and its translation into a QEMU command line.
//!
//! This crate is pure logic. It never touches the file system or spawns
//! anything; where validation needs to know whether a file exists, the caller
//! passes a predicate. That keeps every rule unit-testable without QEMU.

mod argv;
mod spec;

pub use argv::{build_argv, disk_node_name, escape_opt, switch_socket, Accel, RuntimePaths};
pub use spec::{
    parse_and_validate, Accelerator, Boot, DiskFormat, DiskSpec, FieldError, Firmware, HostForward,
    MacAddr, MacAddrError, NicBackend, NicSpec, SpecError, VmSpec, MAX_MEMORY_MIB, MAX_VCPUS,
    MIN_MEMORY_MIB,
};
